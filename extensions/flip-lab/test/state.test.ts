import { test } from 'node:test';
import assert from 'node:assert/strict';

import { foldEvent, initialState, reduce } from '../src/state';
import { IHubEvent, IJobSummary, StreamMessage } from '../src/types';

function job(id: string, submitted = '2026-01-01T00:00:00'): IJobSummary {
  return {
    id,
    status: 'pending',
    round: 0,
    released: 0,
    rounds: null,
    message: '',
    submitted,
    strategy: '',
    metrics: {},
    site_states: {},
    errors: []
  };
}

const ROUND_EVENTS: IHubEvent[] = [
  { type: 'job_started', rounds: 2, strategy: 'fedavg' },
  { type: 'site_state', round: 1, site: 'northgate', state: 'training' },
  { type: 'aggregate', round: 1, phase: 'train', metrics: { loss: 0.5 } },
  { type: 'aggregate', round: 1, phase: 'evaluate', metrics: { loss: 0.4, dice: 0.6 } },
  { type: 'aggregate', round: 2, phase: 'evaluate', metrics: { loss: 0.3, dice: 0.7 } },
  { type: 'job_finished', status: 'completed', message: 'all rounds released' }
];

test('a job folds from pending through its rounds to completed', () => {
  let j = job('1');
  for (const event of ROUND_EVENTS) {
    j = foldEvent(j, event);
  }
  assert.equal(j.status, 'completed');
  assert.equal(j.round, 2);
  assert.equal(j.rounds, 2);
  assert.equal(j.strategy, 'fedavg');
  assert.deepEqual(j.metrics.dice, [[1, 0.6], [2, 0.7]]);
  assert.equal(j.message, 'all rounds released');
});

test('round is the round in progress, released the rounds completed', () => {
  let j = foldEvent(job('1'), { type: 'job_started', rounds: 3 });
  j = foldEvent(j, { type: 'aggregate', round: 1, phase: 'evaluate', metrics: { dice: 0.5 } });
  j = foldEvent(j, { type: 'site_state', round: 2, site: 'a', state: 'training' });
  assert.deepEqual([j.round, j.released], [2, 1]);
  j = foldEvent(j, { type: 'job_finished', status: 'cancelled', rounds_completed: 1 });
  assert.deepEqual([j.round, j.released], [2, 1]);
});

test('train aggregates do not enter the evaluate metric series', () => {
  const j = foldEvent(job('1'), { type: 'aggregate', round: 1, phase: 'train', metrics: { loss: 0.5 } });
  assert.deepEqual(j.metrics, {});
  assert.equal(j.round, 1);
});

test('a repeated aggregate for the same round replaces the point instead of adding one', () => {
  let j = job('1');
  const event = { type: 'aggregate', round: 1, phase: 'evaluate' as const, metrics: { dice: 0.5 } };
  j = foldEvent(foldEvent(j, event), { ...event, metrics: { dice: 0.55 } });
  assert.deepEqual(j.metrics.dice, [[1, 0.55]]);
});

test('folding leaves the previous state untouched', () => {
  const before = job('1');
  foldEvent(before, { type: 'site_state', round: 1, site: 'a', state: 'training' });
  assert.deepEqual(before.site_states, {});
});

test('site errors are kept in words, the most recent five', () => {
  let j = job('1');
  for (let round = 1; round <= 7; round++) {
    j = foldEvent(j, { type: 'site_error', round, site: 'a', kind: 'plan_error', message: `m${round}` });
  }
  assert.equal(j.errors.length, 5);
  assert.equal(j.errors[0].round, 3);
  assert.equal(j.errors[4].message, 'm7');
});

test('a job that finished stays finished when a late job_started arrives', () => {
  let j = foldEvent(job('1'), { type: 'job_finished', status: 'failed', message: 'x' });
  j = foldEvent(j, { type: 'job_started', rounds: 3 });
  assert.equal(j.status, 'failed');
});

test('unknown events change nothing', () => {
  const j = job('1');
  assert.equal(foldEvent(j, { type: 'reply', round: 1 }), j);
});

test('the reducer replaces everything on a snapshot and keeps jobs newest first', () => {
  const message: StreamMessage = {
    type: 'snapshot',
    connection: { state: 'connected', kind: 'local', address: 'h:1', workdir: '/w', ca_file: '', message: '' },
    sites: [],
    jobs: [job('old', '2026-01-01T00:00:00'), job('new', '2026-01-02T00:00:00')]
  };
  const state = reduce(initialState(), message);
  assert.deepEqual(state.jobs.map(j => j.id), ['new', 'old']);
  assert.equal(state.connection.state, 'connected');
});

test('a job message upserts, and job events fold into the right job', () => {
  let state = reduce(initialState(), { type: 'job', job: job('7') });
  state = reduce(state, { type: 'job', job: job('8', '2026-02-01T00:00:00') });
  state = reduce(state, { type: 'job_event', job_id: '7', event: { type: 'job_started', rounds: 4 } });
  assert.equal(state.jobs.find(j => j.id === '7')?.rounds, 4);
  assert.equal(state.jobs.find(j => j.id === '8')?.rounds, null);
  state = reduce(state, { type: 'job', job: { ...job('7'), status: 'running' } });
  assert.equal(state.jobs.length, 2);
  assert.equal(state.jobs.find(j => j.id === '7')?.status, 'running');
});

test('an event for a job the panel has not heard of is ignored', () => {
  const state = initialState();
  assert.equal(reduce(state, { type: 'job_event', job_id: '9', event: { type: 'job_started' } }), state);
});
