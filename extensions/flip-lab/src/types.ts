/**
 * The messages of the FLIP Lab server extension, mirrored from `flip_lab/server/messages.py`.
 * Job ids are strings: Flower's run ids are 64-bit and would lose digits as numbers.
 */

export type ConnectionState =
  | 'disconnected'
  | 'starting'
  | 'connected'
  | 'unreachable'
  | 'stopping'
  | 'stopped'
  | 'failed';

export interface IConnectionInfo {
  state: ConnectionState;
  kind: 'local' | 'remote' | null;
  address: string;
  workdir: string;
  ca_file: string;
  message: string;
}

export interface ISiteRow {
  site: string;
  state: 'online' | 'offline' | 'unknown';
  /** Epoch seconds when the site was last seen online. */
  last_seen: number | null;
  /** Times the site went offline in the last ten minutes. */
  drops: number;
  datasets: string;
}

export interface ISiteErrorNote {
  site: string;
  round: number;
  kind: string;
  message: string;
}

export type JobStatus = 'pending' | 'starting' | 'running' | 'completed' | 'failed' | 'cancelled';

export interface IJobSummary {
  id: string;
  status: JobStatus | string;
  /** The round in progress: the highest round any site or aggregate has reached. */
  round: number;
  /** Rounds whose aggregate the hub released: the rounds completed. */
  released: number;
  rounds: number | null;
  message: string;
  submitted: string;
  strategy: string;
  /** Aggregated evaluate metrics: name -> [round, value] pairs in round order. */
  metrics: Record<string, Array<[number, number]>>;
  site_states: Record<string, string>;
  errors: ISiteErrorNote[];
}

/** The hub events the server forwards to the panel (`PANEL_EVENTS` in `flip_lab/server/views.py`). */
export type HubEventType =
  | 'job_started'
  | 'site_state'
  | 'aggregate'
  | 'round_discarded'
  | 'site_error'
  | 'update_rejected'
  | 'job_finished';

/**
 * A hub event (`flip_common.protocol.Event`), as the server forwards it: every field of every kind in
 * `HubEventType`, each optional since each kind carries some of them. A test (`tests/test_panel_types.py`) keeps
 * this in step with the Python records.
 */
export interface IHubEvent {
  type: HubEventType | string;
  t?: number;
  round?: number;
  rounds?: number;
  rounds_completed?: number;
  strategy?: string;
  min_sites?: number;
  sites?: string[];
  plan_hash?: string;
  phase?: 'train' | 'evaluate';
  site?: string;
  state?: string;
  detail?: string;
  metrics?: Record<string, number>;
  contributors?: string[];
  wall_s?: number;
  kind?: string;
  message?: string;
  reason?: string;
  status?: string;
}

export type StreamMessage =
  | { type: 'snapshot'; connection: IConnectionInfo; sites: ISiteRow[]; jobs: IJobSummary[] }
  | { type: 'connection'; connection: IConnectionInfo }
  | { type: 'sites'; sites: ISiteRow[] }
  | { type: 'job'; job: IJobSummary }
  | { type: 'job_event'; job_id: string; event: IHubEvent };

/** How the panel's live event stream itself is doing (not the federation). */
export type StreamStatus =
  | { kind: 'connecting' }
  | { kind: 'live' }
  | { kind: 'reconnecting'; attempt: number; delayMs: number };
