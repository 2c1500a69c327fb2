import { test } from 'node:test';
import assert from 'node:assert/strict';

import { backoffDelay, DEFAULT_BACKOFF } from '../src/backoff';

const noJitter = { ...DEFAULT_BACKOFF, jitter: 0 };

test('delays double from one second', () => {
  assert.deepEqual([1, 2, 3, 4].map(n => backoffDelay(n, noJitter)), [1000, 2000, 4000, 8000]);
});

test('delays never exceed the cap', () => {
  assert.equal(backoffDelay(30, noJitter), 30000);
  assert.equal(backoffDelay(1000, { ...noJitter, maxMs: 5000 }), 5000);
});

test('jitter only shortens the delay, by at most its fraction', () => {
  const options = { ...DEFAULT_BACKOFF, jitter: 0.2 };
  assert.equal(backoffDelay(3, options, () => 0), 4000);
  assert.equal(backoffDelay(3, options, () => 0.999999), 3200);
});

test('attempts below one count as the first', () => {
  assert.equal(backoffDelay(0, noJitter), 1000);
  assert.equal(backoffDelay(-3, noJitter), 1000);
});
