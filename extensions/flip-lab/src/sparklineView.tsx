/**
 * The live metric sparkline of one job: an SVG line of the aggregated evaluate metric over rounds.
 */
import * as React from 'react';

import { formatMetric } from './format';
import { pickMetric, sparkline } from './sparkline';
import { IJobSummary } from './types';

const WIDTH = 96;
const HEIGHT = 24;

export function MetricSparkline(props: { job: IJobSummary; preferred: string }): JSX.Element {
  const name = pickMetric(props.job.metrics, props.preferred);
  if (name === null) {
    return (
      <div className="jp-FlipLab-metric jp-FlipLab-muted">
        {props.job.status === 'running' || props.job.status === 'pending' || props.job.status === 'starting'
          ? 'Metrics appear after the first evaluated round.'
          : 'No evaluated rounds.'}
      </div>
    );
  }
  const points = props.job.metrics[name];
  const line = sparkline(points, WIDTH, HEIGHT, 3);
  const values = points.map(p => formatMetric(p[1])).join(', ');
  return (
    <div className="jp-FlipLab-metric">
      {line && (
        <span className="jp-FlipLab-metricValue">
          {name} <strong>{formatMetric(line.last.value)}</strong>
          <span className="jp-FlipLab-muted"> · round {line.last.round}</span>
        </span>
      )}
      {line && (
        <svg
          className="jp-FlipLab-sparkline"
          width={WIDTH}
          height={HEIGHT}
          viewBox={`0 0 ${WIDTH} ${HEIGHT}`}
          role="img"
          aria-label={`${name} by round: ${values}`}
        >
          <title>{`${name} by round: ${values}`}</title>
          {points.length > 1 && <path d={line.path} fill="none" strokeWidth={1.5} />}
          <circle cx={line.last.x} cy={line.last.y} r={2.5} />
        </svg>
      )}
    </div>
  );
}
