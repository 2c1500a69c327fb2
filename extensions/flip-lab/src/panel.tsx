/**
 * The FLIP Lab side panel: the connection, the sites and the jobs, in words a researcher can act on.
 */
import { Clipboard } from '@jupyterlab/apputils';
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import * as React from 'react';

import {
  attachLine,
  connectionHeadline,
  errorWords,
  IHeadline,
  jobHeadline,
  progress,
  siteStatesWords,
  sitesHeading,
  siteStatusWords,
  streamBanner
} from './format';
import { flipIcon } from './icon';
import { PanelModel } from './model';
import { MetricSparkline } from './sparklineView';
import { isFinal } from './state';
import { IConnectionInfo, IJobSummary, ISiteRow } from './types';

export interface IPanelActions {
  dispatch: () => void;
  openDashboard: (jobId: string) => void;
}

export class FlipLabPanel extends ReactWidget {
  constructor(
    readonly model: PanelModel,
    private actions: IPanelActions
  ) {
    super();
    this.id = 'flip-lab-panel';
    this.addClass('jp-FlipLab');
    this.title.icon = flipIcon;
    this.title.caption = 'FLIP Lab: federation, sites and jobs';
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this.model.changed}>
        {() => <PanelView model={this.model} actions={this.actions} />}
      </UseSignal>
    );
  }
}

function useNow(everyMs: number): number {
  const [now, setNow] = React.useState(() => Date.now() / 1000);
  React.useEffect(() => {
    const timer = setInterval(() => setNow(Date.now() / 1000), everyMs);
    return () => clearInterval(timer);
  }, [everyMs]);
  return now;
}

/** Seconds since `active` became true, ticking every second; `undefined` while it is false. */
function useElapsed(active: boolean): number | undefined {
  const [since, setSince] = React.useState<number | null>(null);
  const [now, setNow] = React.useState(() => Date.now());
  React.useEffect(() => {
    if (!active) {
      setSince(null);
      return;
    }
    setSince(Date.now());
    setNow(Date.now());
    const timer = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(timer);
  }, [active]);
  return active && since !== null ? (now - since) / 1000 : undefined;
}

function Headline(props: { headline: IHeadline; className?: string }): JSX.Element {
  const { tone, title, detail } = props.headline;
  return (
    <div className={`jp-FlipLab-headline jp-FlipLab-tone-${tone} ${props.className ?? ''}`}>
      <span className="jp-FlipLab-dot" aria-hidden="true" />
      <div>
        <div className="jp-FlipLab-headlineTitle">{title}</div>
        {detail && <div className="jp-FlipLab-headlineDetail">{detail}</div>}
      </div>
    </div>
  );
}

function PanelView(props: { model: PanelModel; actions: IPanelActions }): JSX.Element {
  const { model, actions } = props;
  const { connection, sites, jobs } = model.state;
  const banner = streamBanner(model.streamStatus);
  const notice = model.notice;
  return (
    <div className="jp-FlipLab-body">
      <header className="jp-FlipLab-header">
        <div>
          <h2 className="jp-FlipLab-title">FLIP Lab</h2>
          <div className="jp-FlipLab-subtitle">Federated studies on data that stays at each site</div>
        </div>
        <button
          className="jp-FlipLab-iconButton"
          title="Refresh sites and jobs"
          aria-label="Refresh sites and jobs"
          onClick={() => void model.refresh()}
        >
          ↻
        </button>
      </header>
      {banner && (
        <div className="jp-FlipLab-banner" role="status">
          {banner}
        </div>
      )}
      {notice && (
        <div className={`jp-FlipLab-notice jp-FlipLab-notice-${notice.tone}`} role="alert">
          <span>{notice.text}</span>
          <button
            className="jp-FlipLab-iconButton jp-FlipLab-dismiss"
            title="Dismiss"
            aria-label="Dismiss"
            onClick={() => model.dismissNotice()}
          >
            ×
          </button>
        </div>
      )}
      <FederationSection model={model} />
      {connection.state !== 'disconnected' && connection.state !== 'failed' && (
        <SitesSection sites={sites} />
      )}
      {connection.kind !== null && (
        <JobsSection model={model} jobs={jobs} actions={actions} />
      )}
    </div>
  );
}

function FederationSection(props: { model: PanelModel }): JSX.Element {
  const { model } = props;
  const connection = model.state.connection;
  const [sites, setSites] = React.useState(model.settings.defaultSites);
  const [address, setAddress] = React.useState(model.settings.defaultAddress);
  const busy = model.busy !== '' || connection.state === 'starting' || connection.state === 'stopping';
  const elapsed = useElapsed(connection.state === 'starting');
  const canStart = ['disconnected', 'stopped', 'failed'].includes(connection.state);
  return (
    <section className="jp-FlipLab-section" aria-label="Federation">
      <h3 className="jp-FlipLab-sectionTitle">Federation</h3>
      <Headline headline={connectionHeadline(connection, elapsed)} />
      {connection.address && (
        <div className="jp-FlipLab-facts">
          Hub <code>{connection.address}</code>
        </div>
      )}
      {model.busy && <div className="jp-FlipLab-muted">{model.busy} ...</div>}
      {connection.state === 'connected' && <AttachLine connection={connection} />}
      {canStart && (
        <div className="jp-FlipLab-form">
          <div className="jp-FlipLab-row">
            <label className="jp-FlipLab-label">
              Sites
              <input
                className="jp-FlipLab-number"
                type="number"
                min={1}
                max={16}
                value={sites}
                aria-label="Number of simulated sites"
                onChange={e => setSites(Math.max(1, Math.min(16, Number(e.target.value) || 1)))}
              />
            </label>
            <button
              className="jp-FlipLab-button jp-mod-accept"
              disabled={busy}
              onClick={() => void model.startLocal(sites)}
            >
              Start local federation
            </button>
          </div>
          <div className="jp-FlipLab-or">or connect to a running hub</div>
          <form
            className="jp-FlipLab-row"
            onSubmit={e => {
              e.preventDefault();
              void model.connect(address);
            }}
          >
            <input
              className="jp-FlipLab-text"
              type="text"
              placeholder="host:port"
              value={address}
              aria-label="Hub address"
              onChange={e => setAddress(e.target.value)}
            />
            <button className="jp-FlipLab-button" type="submit" disabled={busy || !address.trim()}>
              Connect
            </button>
          </form>
        </div>
      )}
      {!canStart && connection.state !== 'starting' && (
        <div className="jp-FlipLab-row">
          {connection.kind === 'local' && (
            <button
              className="jp-FlipLab-button jp-mod-warn"
              disabled={busy}
              onClick={() => void model.stopLocal()}
            >
              Stop local federation
            </button>
          )}
          {connection.kind === 'remote' && (
            <button className="jp-FlipLab-button" disabled={busy} onClick={() => void model.disconnect()}>
              Disconnect
            </button>
          )}
        </div>
      )}
    </section>
  );
}

/** The line a notebook pastes to use this federation, with a button that copies it. */
function AttachLine(props: { connection: IConnectionInfo }): JSX.Element | null {
  const line = attachLine(props.connection);
  const [copied, setCopied] = React.useState(false);
  React.useEffect(() => {
    if (!copied) {
      return;
    }
    const timer = setTimeout(() => setCopied(false), 2000);
    return () => clearTimeout(timer);
  }, [copied]);
  if (line === null) {
    return null;
  }
  const hint =
    props.connection.kind === 'local'
      ? 'Notebooks here find it by themselves (flip_lab.local_federation()), or paste this line:'
      : 'Paste this line into a notebook to use it:';
  return (
    <div className="jp-FlipLab-attach" aria-label="Use this federation from a notebook">
      <div className="jp-FlipLab-attachHead">
        <span className="jp-FlipLab-muted">{hint}</span>
        <button
          className="jp-FlipLab-button"
          title="Copy this line to paste it into a notebook"
          onClick={() => {
            Clipboard.copyToSystem(line);
            setCopied(true);
          }}
        >
          {copied ? 'Copied' : 'Copy'}
        </button>
      </div>
      <code className="jp-FlipLab-attachLine">{line}</code>
    </div>
  );
}

function SitesSection(props: { sites: ISiteRow[] }): JSX.Element {
  const now = useNow(5000);
  return (
    <section className="jp-FlipLab-section" aria-label="Sites">
      <h3 className="jp-FlipLab-sectionTitle">{sitesHeading(props.sites)}</h3>
      {props.sites.length === 0 && (
        <div className="jp-FlipLab-muted">No site has connected to the hub yet.</div>
      )}
      <ul className="jp-FlipLab-list">
        {props.sites.map(site => (
          <li key={site.site} className={`jp-FlipLab-site jp-FlipLab-site-${site.state}`}>
            <div className="jp-FlipLab-siteLine">
              <span className="jp-FlipLab-dot" aria-hidden="true" />
              <span className="jp-FlipLab-siteName">{site.site}</span>
              <span className="jp-FlipLab-siteStatus">{siteStatusWords(site, now)}</span>
            </div>
            {site.datasets && <div className="jp-FlipLab-siteData">{site.datasets}</div>}
          </li>
        ))}
      </ul>
    </section>
  );
}

function JobsSection(props: { model: PanelModel; jobs: IJobSummary[]; actions: IPanelActions }): JSX.Element {
  const { model, jobs, actions } = props;
  const connected = model.state.connection.state === 'connected';
  return (
    <section className="jp-FlipLab-section" aria-label="Jobs">
      <div className="jp-FlipLab-sectionHeader">
        <h3 className="jp-FlipLab-sectionTitle">Jobs</h3>
        <button
          className="jp-FlipLab-button jp-mod-accept jp-FlipLab-small"
          disabled={!connected}
          title="Send the plan defined in the current notebook to this federation"
          onClick={() => actions.dispatch()}
        >
          Dispatch notebook plan
        </button>
      </div>
      {jobs.length === 0 && (
        <div className="jp-FlipLab-muted">
          No jobs on this hub yet. Define a plan in a notebook and dispatch it.
        </div>
      )}
      <ul className="jp-FlipLab-list">
        {jobs.map(job => (
          <JobCard key={job.id} job={job} model={model} actions={actions} />
        ))}
      </ul>
    </section>
  );
}

function JobCard(props: { job: IJobSummary; model: PanelModel; actions: IPanelActions }): JSX.Element {
  const { job, model, actions } = props;
  const headline = jobHeadline(job);
  const fraction = progress(job);
  const where = isFinal(job.status) ? '' : siteStatesWords(job.site_states);
  return (
    <li className={`jp-FlipLab-job jp-FlipLab-job-${job.status}`} data-job-id={job.id}>
      <div className="jp-FlipLab-jobTitle">
        Job <span className="jp-FlipLab-jobId">{job.id}</span>
        {job.strategy && <span className="jp-FlipLab-muted"> · {job.strategy}</span>}
      </div>
      <Headline headline={headline} className="jp-FlipLab-jobState" />
      <div
        className="jp-FlipLab-progress"
        role="progressbar"
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={Math.round(fraction * 100)}
        aria-label={`Job ${job.id} progress`}
      >
        <div className="jp-FlipLab-progressFill" style={{ width: `${Math.round(fraction * 100)}%` }} />
      </div>
      {where && <div className="jp-FlipLab-siteStates">{where}</div>}
      <MetricSparkline job={job} preferred={model.settings.metric} />
      {job.errors.length > 0 && (
        <ul className="jp-FlipLab-errors">
          {job.errors.map((note, i) => (
            <li key={i}>{errorWords(note)}</li>
          ))}
        </ul>
      )}
      <div className="jp-FlipLab-row">
        <button className="jp-FlipLab-button jp-FlipLab-small" onClick={() => actions.openDashboard(job.id)}>
          Open dashboard
        </button>
        {!isFinal(job.status) && (
          <button
            className="jp-FlipLab-button jp-mod-warn jp-FlipLab-small"
            disabled={model.busy !== ''}
            onClick={() => void model.cancel(job.id)}
          >
            Cancel
          </button>
        )}
      </div>
    </li>
  );
}
