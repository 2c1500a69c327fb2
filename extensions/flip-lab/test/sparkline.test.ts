import { test } from 'node:test';
import assert from 'node:assert/strict';

import { pickMetric, sparkline } from '../src/sparkline';

test('rounds run left to right and larger values are drawn higher', () => {
  const line = sparkline([[1, 0.2], [2, 0.6], [3, 0.4]], 100, 20, 0)!;
  assert.equal(line.path, 'M0 20 L50 0 L100 10');
  assert.deepEqual(line.last, { x: 100, y: 10, value: 0.4, round: 3 });
  assert.equal(line.min, 0.2);
  assert.equal(line.max, 0.6);
});

test('padding keeps the line inside the box', () => {
  const line = sparkline([[1, 0], [2, 1]], 100, 20, 2)!;
  assert.equal(line.path, 'M2 18 L98 2');
});

test('points in any order are drawn in round order', () => {
  const line = sparkline([[3, 1], [1, 0]], 10, 10, 0)!;
  assert.equal(line.path, 'M0 10 L10 0');
});

test('a flat series sits in the middle and a single point in the centre', () => {
  assert.equal(sparkline([[1, 0.5], [2, 0.5]], 100, 20, 0)!.path, 'M0 10 L100 10');
  assert.equal(sparkline([[4, 0.9]], 100, 20, 0)!.path, 'M50 10');
});

test('non-finite values are skipped; nothing drawable gives null', () => {
  assert.equal(sparkline([[1, NaN], [2, Infinity]], 100, 20), null);
  assert.equal(sparkline([], 100, 20), null);
  assert.equal(sparkline([[1, NaN], [2, 0.3]], 100, 20, 0)!.path, 'M50 10');
});

const metrics = (...names: string[]) =>
  Object.fromEntries(names.map(n => [n, [[1, 0.5]] as Array<[number, number]>]));

for (const [names, preferred, expected] of [
  [['loss', 'dice'], '', 'dice'],
  [['loss', 'accuracy', 'dice'], '', 'dice'],
  [['loss', 'dice'], 'loss', 'loss'],
  [['loss', 'dice'], 'auc', 'dice'],
  [['val_loss', 'sensitivity'], '', 'sensitivity'],
  [['loss'], '', 'loss']
] as Array<[string[], string, string]>) {
  test(`pickMetric(${names.join(',')}, "${preferred}") is ${expected}`, () => {
    assert.equal(pickMetric(metrics(...names), preferred), expected);
  });
}

test('pickMetric gives null before any evaluated round', () => {
  assert.equal(pickMetric({}), null);
  assert.equal(pickMetric({ dice: [] }), null);
});
