import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  connectionHeadline,
  attachLine,
  dashboardCode,
  dispatchCode,
  errorWords,
  jobHeadline,
  relativeTime,
  siteStatusWords,
  streamBanner
} from '../src/format';
import { DISCONNECTED } from '../src/state';
import { IJobSummary } from '../src/types';

const local = { ...DISCONNECTED, state: 'connected' as const, kind: 'local' as const, address: '127.0.0.1:5', workdir: '/tmp/fed "x"' };
const remote = { ...DISCONNECTED, state: 'connected' as const, kind: 'remote' as const, address: 'hub:9093', ca_file: '/ca.pem' };

test('dispatch code attaches to a local federation by folder, quoting it as Python', () => {
  assert.equal(
    dispatchCode(local),
    'import flip_lab.panel\nflip_lab.panel.dispatch(workdir="/tmp/fed \\"x\\"");'
  );
});

test('dispatch code reaches a remote hub with its CA file; none when disconnected', () => {
  assert.equal(
    dispatchCode(remote),
    'import flip_lab.panel\nflip_lab.panel.dispatch(address="hub:9093", ca_file="/ca.pem");'
  );
  assert.equal(dispatchCode(DISCONNECTED), null);
});

test('dashboard code re-attaches to the job by id and refuses ids that are not numbers', () => {
  assert.equal(dashboardCode(local, '123'), 'import flip_lab\n\nflip_lab.attach("/tmp/fed \\"x\\"").job(123)');
  assert.equal(
    dashboardCode(remote, '18446744073709551615'),
    'import flip_lab\n\nflip_lab.connect("hub:9093", root_certificates="/ca.pem").job(18446744073709551615)'
  );
  assert.equal(dashboardCode(local, '1); import os'), null);
});

test('attachLine is the one line a notebook pastes to use the panel\'s federation', () => {
  assert.equal(attachLine(local), 'fed = flip_lab.attach("/tmp/fed \\"x\\"")');
  assert.equal(attachLine(remote), 'fed = flip_lab.connect("hub:9093", root_certificates="/ca.pem")');
  assert.equal(attachLine(DISCONNECTED), null);
});

for (const [seconds, words] of [
  [0, 'just now'],
  [42, '42 s ago'],
  [125, '2 min ago'],
  [7300, '2 h ago'],
  [90000, '1 day ago'],
  [200000, '2 days ago']
] as Array<[number, string]>) {
  test(`relativeTime(${seconds}) is "${words}"`, () => {
    assert.equal(relativeTime(seconds), words);
  });
}

test('a flapping site says how often it dropped out; an offline one when it was last seen', () => {
  const row = { site: 'a', state: 'online' as const, last_seen: 100, drops: 3, datasets: '' };
  assert.equal(siteStatusWords(row, 100), 'Online · dropped out 3 times in the last 10 min');
  assert.equal(siteStatusWords({ ...row, state: 'offline', drops: 1 }, 220), 'Offline · last seen 2 min ago · dropped out 1 time in the last 10 min');
  assert.equal(siteStatusWords({ ...row, state: 'unknown' }, 0), 'Status unknown while the hub is not answering');
});

const base: IJobSummary = {
  id: '1', status: 'running', round: 2, released: 1, rounds: 3, message: '', submitted: '', strategy: '',
  metrics: {}, site_states: {}, errors: []
};

for (const [job, tone, title] of [
  // round 2 is in progress after round 1 was released: "round 2 of 3", as the dashboard says
  [{ ...base }, 'busy', 'Running · round 2 of 3'],
  [{ ...base, round: 0, released: 0 }, 'busy', 'Running · sites preparing'],
  [{ ...base, status: 'completed', round: 3, released: 3 }, 'ok', 'Completed · 3 of 3 rounds'],
  [{ ...base, status: 'completed', round: 1, released: 1, rounds: 1 }, 'ok', 'Completed · 1 of 1 round'],
  [{ ...base, status: 'failed', message: 'site a failed' }, 'error', 'Failed'],
  [{ ...base, status: 'cancelled' }, 'warn', 'Cancelled after 1 of 3 rounds'],
  [{ ...base, status: 'pending' }, 'busy', 'Waiting for the hub to start it']
] as Array<[IJobSummary, string, string]>) {
  test(`job ${job.status} at round ${job.round} reads "${title}"`, () => {
    const headline = jobHeadline(job);
    assert.equal(headline.title, title);
    assert.equal(headline.tone, tone);
  });
}

test('a failed job carries the hub message as its detail', () => {
  assert.equal(jobHeadline({ ...base, status: 'failed', message: 'lost contact with the hub' }).detail, 'lost contact with the hub');
});

test('errors read as site, round, kind and message', () => {
  assert.equal(
    errorWords({ site: 'northgate', round: 2, kind: 'plan_error', message: 'ValueError at plan.py line 3' }),
    'northgate, round 2: plan error: ValueError at plan.py line 3'
  );
  assert.equal(errorWords({ site: '', round: 1, kind: 'round_discarded', message: '' }), 'Round 1: round discarded');
});

test('the connection headline says every state in words', () => {
  for (const state of ['disconnected', 'starting', 'connected', 'unreachable', 'stopping', 'stopped', 'failed'] as const) {
    const headline = connectionHeadline({ ...DISCONNECTED, state });
    assert.ok(headline.title.length > 5, state);
    assert.ok(!headline.title.includes('_'), state);
  }
});

test('a starting federation counts its seconds instead of promising a duration', () => {
  const starting = { ...DISCONNECTED, state: 'starting' as const };
  assert.equal(connectionHeadline(starting).title, 'Starting the local federation');
  assert.equal(connectionHeadline(starting, 42.7).title, 'Starting the local federation · 42 s so far');
  assert.equal(connectionHeadline({ ...DISCONNECTED, state: 'connected' as const, kind: 'local' as const }, 5).title,
    'Local federation running');
});

test('the stream banner counts down the reconnect and disappears when live', () => {
  assert.equal(streamBanner({ kind: 'live' }), null);
  const text = streamBanner({ kind: 'reconnecting', attempt: 3, delayMs: 4000 })!;
  assert.match(text, /Lost contact with the Jupyter server/);
  assert.match(text, /4 s \(attempt 3\)/);
});
