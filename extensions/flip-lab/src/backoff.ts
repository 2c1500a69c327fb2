/**
 * Reconnection delays for the live event stream: exponential, capped, with jitter so that many open
 * panels do not all knock on a restarted server at the same instant. Pure (tested with node).
 */

export interface IBackoffOptions {
  /** Delay before the first retry, in milliseconds. */
  initialMs: number;
  /** Longest delay, in milliseconds. */
  maxMs: number;
  /** Growth per attempt. */
  factor: number;
  /** Fraction of the delay that is randomised away (0: none, 1: anywhere from 0 to the delay). */
  jitter: number;
}

export const DEFAULT_BACKOFF: IBackoffOptions = {
  initialMs: 1000,
  maxMs: 30000,
  factor: 2,
  jitter: 0.2
};

/** The wait before retry number `attempt` (1 for the first retry). */
export function backoffDelay(
  attempt: number,
  options: IBackoffOptions = DEFAULT_BACKOFF,
  random: () => number = Math.random
): number {
  const n = Math.max(1, Math.floor(attempt));
  const base = Math.min(options.maxMs, options.initialMs * Math.pow(options.factor, n - 1));
  const jitter = Math.min(1, Math.max(0, options.jitter));
  return Math.round(base * (1 - jitter * random()));
}
