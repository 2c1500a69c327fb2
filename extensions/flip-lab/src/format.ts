/**
 * Everything the panel says in words, and the Python it sends to a kernel. Pure (tested with node).
 */
import { IConnectionInfo, IJobSummary, ISiteErrorNote, ISiteRow, StreamStatus } from './types';

export type Tone = 'ok' | 'busy' | 'warn' | 'error' | 'idle';

export interface IHeadline {
  tone: Tone;
  title: string;
  detail: string;
}

/** `elapsedS`: seconds since the panel saw the local federation start, counted instead of a promised duration. */
export function connectionHeadline(c: IConnectionInfo, elapsedS?: number): IHeadline {
  switch (c.state) {
    case 'starting': {
      const elapsed = elapsedS === undefined ? '' : ` · ${Math.max(0, Math.floor(elapsedS))} s so far`;
      return { tone: 'busy', title: `Starting the local federation${elapsed}`, detail: c.message };
    }
    case 'connected':
      return {
        tone: 'ok',
        title: c.kind === 'local' ? 'Local federation running' : 'Connected to the hub',
        detail: c.message
      };
    case 'unreachable':
      return { tone: 'warn', title: 'The hub is not answering', detail: c.message };
    case 'stopping':
      return { tone: 'busy', title: 'Stopping the local federation', detail: c.message };
    case 'stopped':
      return { tone: 'warn', title: 'The local federation has stopped', detail: c.message };
    case 'failed':
      return { tone: 'error', title: 'The local federation did not start', detail: c.message };
    default:
      return {
        tone: 'idle',
        title: 'Not connected',
        detail:
          c.message ||
          'Start a local federation of simulated hospitals, or connect to a hub by its address.'
      };
  }
}

/** The banner about the panel's own link to the Jupyter server; `null` while it is live. */
export function streamBanner(status: StreamStatus): string | null {
  switch (status.kind) {
    case 'connecting':
      return 'Connecting to the Jupyter server ...';
    case 'reconnecting': {
      const seconds = Math.max(1, Math.round(status.delayMs / 1000));
      return (
        'Lost contact with the Jupyter server (it may be restarting). ' +
        `Trying again in ${seconds} s (attempt ${status.attempt}); the panel recovers on its own.`
      );
    }
    default:
      return null;
  }
}

export function relativeTime(secondsAgo: number): string {
  const s = Math.max(0, Math.round(secondsAgo));
  if (s < 5) {
    return 'just now';
  }
  if (s < 60) {
    return `${s} s ago`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ago`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)} h ago`;
  }
  const days = Math.floor(s / 86400);
  return `${days} day${days === 1 ? '' : 's'} ago`;
}

export function siteStatusWords(row: ISiteRow, nowSeconds: number): string {
  const drops =
    row.drops > 0
      ? ` · dropped out ${row.drops} time${row.drops === 1 ? '' : 's'} in the last 10 min`
      : '';
  if (row.state === 'online') {
    return `Online${drops}`;
  }
  if (row.state === 'unknown') {
    return 'Status unknown while the hub is not answering';
  }
  const seen = row.last_seen !== null ? ` · last seen ${relativeTime(nowSeconds - row.last_seen)}` : '';
  return `Offline${seen}${drops}`;
}

export function sitesHeading(sites: ISiteRow[]): string {
  if (sites.length === 0) {
    return 'Sites';
  }
  const online = sites.filter(s => s.state === 'online').length;
  return `Sites · ${online} of ${sites.length} online`;
}

const SITE_STATE_WORDS: Record<string, string> = {
  waiting_approval: 'waiting for approval',
  preparing_data: 'preparing data',
  training: 'training',
  evaluating: 'evaluating',
  done: 'done',
  failed: 'failed',
  withheld: 'withheld by policy',
  offline: 'offline'
};

export function siteStateWord(state: string): string {
  return SITE_STATE_WORDS[state] ?? state.replace(/_/g, ' ');
}

/**
 * "round k of n" means what the notebook's dashboard means by it (`flip_lab.display.round_words`): while a job
 * runs, k is the round in progress; once it has ended, the rounds completed.
 */
export function jobHeadline(job: IJobSummary): IHeadline {
  const of = job.rounds ? ` of ${job.rounds}` : '';
  const released = job.released ?? 0;
  const plural = (job.rounds ?? released) === 1 ? 'round' : 'rounds';
  switch (job.status) {
    case 'pending':
      return { tone: 'busy', title: 'Waiting for the hub to start it', detail: '' };
    case 'starting':
      return { tone: 'busy', title: 'Starting', detail: '' };
    case 'running':
      return {
        tone: 'busy',
        title: job.round > 0 ? `Running · round ${job.round}${of}` : 'Running · sites preparing',
        detail: ''
      };
    case 'completed':
      return {
        tone: 'ok',
        title: `Completed · ${released}${of} ${plural}`,
        detail: job.message
      };
    case 'cancelled':
      return {
        tone: 'warn',
        title: released > 0 ? `Cancelled after ${released}${of} ${plural}` : 'Cancelled before a round was completed',
        detail: ''
      };
    case 'failed':
      return { tone: 'error', title: 'Failed', detail: job.message };
    default:
      return { tone: 'idle', title: job.status, detail: job.message };
  }
}

/** Where each site is in the job, e.g. "northgate: training · st-aldhelm: preparing data". */
export function siteStatesWords(states: Record<string, string>): string {
  return Object.keys(states)
    .sort()
    .map(site => `${site}: ${siteStateWord(states[site])}`)
    .join(' · ');
}

export function errorWords(note: ISiteErrorNote): string {
  const where = note.site ? `${note.site}, round ${note.round}` : `Round ${note.round}`;
  const kind = note.kind.replace(/_/g, ' ');
  return note.message ? `${where}: ${kind}: ${note.message}` : `${where}: ${kind}`;
}

/** How far the job is, 0 to 1. */
export function progress(job: IJobSummary): number {
  if (job.status === 'completed') {
    return 1;
  }
  return job.rounds ? Math.min(1, (job.released ?? 0) / job.rounds) : 0;
}

export function formatMetric(value: number): string {
  if (!Number.isFinite(value)) {
    return String(value);
  }
  return Math.abs(value) >= 1000 ? value.toExponential(2) : value.toFixed(3);
}

/** A Python string literal (JSON string escapes are valid Python). */
export function py(text: string): string {
  return JSON.stringify(text);
}

/** The code the dispatch command runs in the notebook's kernel; `null` when not connected. */
export function dispatchCode(c: IConnectionInfo): string | null {
  let args: string;
  if (c.workdir) {
    args = `workdir=${py(c.workdir)}`;
  } else if (c.address) {
    args = `address=${py(c.address)}` + (c.ca_file ? `, ca_file=${py(c.ca_file)}` : '');
  } else {
    return null;
  }
  return `import flip_lab.panel\nflip_lab.panel.dispatch(${args});`;
}

/** The federation as a notebook names it, e.g. `flip_lab.attach("/home/me/.flip-lab/lab/local")`; `null` when
 * not connected. */
export function federationCode(c: IConnectionInfo): string | null {
  if (c.workdir) {
    return `flip_lab.attach(${py(c.workdir)})`;
  }
  if (c.address) {
    const ca = c.ca_file ? `, root_certificates=${py(c.ca_file)}` : '';
    return `flip_lab.connect(${py(c.address)}${ca})`;
  }
  return null;
}

/** The one line a notebook pastes to use the panel's federation. */
export function attachLine(c: IConnectionInfo): string | null {
  const federation = federationCode(c);
  return federation ? `fed = ${federation}` : null;
}

/** The cell "Open dashboard" inserts: re-attach to the job by id and display it. */
export function dashboardCode(c: IConnectionInfo, jobId: string): string | null {
  const federation = federationCode(c);
  if (!/^\d+$/.test(jobId) || federation === null) {
    return null;
  }
  return `import flip_lab\n\n${federation}.job(${jobId})`;
}
