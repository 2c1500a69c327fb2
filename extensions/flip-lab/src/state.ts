/**
 * The panel's state and its reducer: pure functions, no DOM, no Jupyter imports (tested with node).
 * `foldEvent` mirrors the server's fold (`flip_lab/jobview.py`, read by `job_summary` in `flip_lab/server/views.py`), so the snapshot a reconnecting panel
 * receives equals what it would have built from the live events.
 */
import { IConnectionInfo, IHubEvent, IJobSummary, ISiteRow, StreamMessage } from './types';

export const FINAL_STATUSES = ['completed', 'failed', 'cancelled'];
const MAX_ERRORS = 5;

export interface IPanelState {
  connection: IConnectionInfo;
  sites: ISiteRow[];
  /** Newest first. */
  jobs: IJobSummary[];
}

export const DISCONNECTED: IConnectionInfo = {
  state: 'disconnected',
  kind: null,
  address: '',
  workdir: '',
  ca_file: '',
  message: ''
};

export function initialState(): IPanelState {
  return { connection: { ...DISCONNECTED }, sites: [], jobs: [] };
}

export function isFinal(status: string): boolean {
  return FINAL_STATUSES.includes(status);
}

/** Apply one hub event to a job; returns a new object, the input is left unchanged. */
export function foldEvent(job: IJobSummary, event: IHubEvent): IJobSummary {
  const next: IJobSummary = {
    ...job,
    metrics: { ...job.metrics },
    site_states: { ...job.site_states },
    errors: [...job.errors]
  };
  const round = Number(event.round ?? 0);
  switch (event.type) {
    case 'job_started':
      if (!isFinal(next.status)) {
        next.status = 'running';
      }
      next.rounds = Number(event.rounds ?? 0) || next.rounds;
      next.strategy = String(event.strategy ?? '');
      break;
    case 'site_state':
      next.site_states[String(event.site)] = String(event.state);
      next.round = Math.max(next.round, round);
      break;
    case 'aggregate':
      next.round = Math.max(next.round, round);
      next.released = Math.max(next.released ?? 0, round);
      if (event.phase === 'evaluate') {
        for (const [name, value] of Object.entries(event.metrics ?? {})) {
          const series = (next.metrics[name] ?? []).filter(p => p[0] !== round);
          series.push([round, Number(value)]);
          series.sort((a, b) => a[0] - b[0]);
          next.metrics[name] = series;
        }
      }
      break;
    case 'site_error':
    case 'update_rejected':
    case 'round_discarded':
      next.errors = [
        ...next.errors,
        {
          site: String(event.site ?? ''),
          round,
          kind: String(event.kind ?? event.type),
          message: String(event.message ?? event.reason ?? '')
        }
      ].slice(-MAX_ERRORS);
      break;
    case 'job_finished':
      next.status = String(event.status);
      next.message = String(event.message ?? '');
      next.released = Math.max(next.released ?? 0, Number(event.rounds_completed ?? 0));
      break;
    default:
      return job;
  }
  return next;
}

function byNewest(a: IJobSummary, b: IJobSummary): number {
  return a.submitted < b.submitted ? 1 : a.submitted > b.submitted ? -1 : 0;
}

/** The panel's reducer: the state after one stream message. */
export function reduce(state: IPanelState, message: StreamMessage): IPanelState {
  switch (message.type) {
    case 'snapshot':
      return {
        connection: message.connection,
        sites: message.sites,
        jobs: [...message.jobs].sort(byNewest)
      };
    case 'connection':
      return { ...state, connection: message.connection };
    case 'sites':
      return { ...state, sites: message.sites };
    case 'job': {
      const others = state.jobs.filter(j => j.id !== message.job.id);
      return { ...state, jobs: [...others, message.job].sort(byNewest) };
    }
    case 'job_event': {
      const index = state.jobs.findIndex(j => j.id === message.job_id);
      if (index < 0) {
        return state; // the job message that introduces it always comes first; stay safe if it did not
      }
      const jobs = [...state.jobs];
      jobs[index] = foldEvent(jobs[index], message.event);
      return { ...state, jobs };
    }
    default:
      return state;
  }
}
