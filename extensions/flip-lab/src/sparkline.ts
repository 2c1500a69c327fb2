/**
 * The live metric sparkline: which metric to draw and the SVG path for it. Pure (tested with node).
 */

/** Metrics a segmentation or classification study reports, best first; losses only when nothing else. */
const PREFERRED = ['dice', 'accuracy', 'auc', 'f1', 'iou'];

/**
 * The metric to draw: `preferred` if the job reports it, else the first of the usual quality metrics,
 * else the first metric that is not a loss, else whatever there is. `null` when there are none yet.
 */
export function pickMetric(
  metrics: Record<string, Array<[number, number]>>,
  preferred = ''
): string | null {
  const names = Object.keys(metrics).filter(n => metrics[n].length > 0).sort();
  if (names.length === 0) {
    return null;
  }
  if (preferred && names.includes(preferred)) {
    return preferred;
  }
  for (const name of PREFERRED) {
    if (names.includes(name)) {
      return name;
    }
  }
  return names.find(n => !n.toLowerCase().includes('loss')) ?? names[0];
}

export interface ISparkline {
  /** SVG path data, "M x y L x y ..." in the box's coordinates. */
  path: string;
  last: { x: number; y: number; value: number; round: number };
  min: number;
  max: number;
}

function r2(value: number): number {
  return Math.round(value * 100) / 100;
}

/**
 * Lay `points` ([round, value], any order) out in a `width` x `height` box with `pad` pixels of margin.
 * Rounds map to x (first round left, last right); larger values are higher. A flat series sits in the
 * middle; non-finite values are skipped. `null` when no point is drawable.
 */
export function sparkline(
  points: Array<[number, number]>,
  width: number,
  height: number,
  pad = 2
): ISparkline | null {
  const usable = points
    .filter(([round, value]) => Number.isFinite(round) && Number.isFinite(value))
    .sort((a, b) => a[0] - b[0]);
  if (usable.length === 0) {
    return null;
  }
  const rounds = usable.map(p => p[0]);
  const values = usable.map(p => p[1]);
  const minX = rounds[0];
  const maxX = rounds[rounds.length - 1];
  const min = Math.min(...values);
  const max = Math.max(...values);
  const innerW = Math.max(0, width - 2 * pad);
  const innerH = Math.max(0, height - 2 * pad);
  const x = (round: number): number =>
    maxX === minX ? width / 2 : pad + ((round - minX) / (maxX - minX)) * innerW;
  const y = (value: number): number =>
    max === min ? height / 2 : pad + (1 - (value - min) / (max - min)) * innerH;
  const coords = usable.map(([round, value]) => [r2(x(round)), r2(y(value))]);
  const path = coords.map(([px, py], i) => `${i === 0 ? 'M' : 'L'}${px} ${py}`).join(' ');
  const [lastX, lastY] = coords[coords.length - 1];
  const [lastRound, lastValue] = usable[usable.length - 1];
  return { path, last: { x: lastX, y: lastY, value: lastValue, round: lastRound }, min, max };
}
