/**
 * The panel's model: the reduced state from the event stream, the stream's own health, and the outcome of
 * the last action the researcher took, all as data the view renders. Actions never throw: a refusal becomes
 * a notice in words.
 */
import { ISignal, Signal } from '@lumino/signaling';

import { api } from './api';
import { EventStream } from './events';
import { initialState, IPanelState, reduce } from './state';
import { IBackoffOptions } from './backoff';
import { StreamMessage, StreamStatus } from './types';

export interface INotice {
  tone: 'ok' | 'error';
  text: string;
}

export interface IPanelSettings {
  defaultSites: number;
  defaultAddress: string;
  refreshInterval: number;
  metric: string;
  maxReconnectDelay: number;
}

export const DEFAULT_SETTINGS: IPanelSettings = {
  defaultSites: 2,
  defaultAddress: '',
  refreshInterval: 2,
  metric: '',
  maxReconnectDelay: 30
};

export class PanelModel {
  constructor(settings: IPanelSettings = DEFAULT_SETTINGS) {
    this._settings = settings;
    this._stream = new EventStream({
      onMessage: message => this._onMessage(message),
      onStatus: status => {
        this._streamStatus = status;
        this._changed.emit();
      },
      intervalSeconds: settings.refreshInterval,
      backoff: this._backoff(settings)
    });
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get state(): IPanelState {
    return this._state;
  }

  get streamStatus(): StreamStatus {
    return this._streamStatus;
  }

  get settings(): IPanelSettings {
    return this._settings;
  }

  /** What the panel is doing on the researcher's behalf right now, e.g. "Cancelling job 12". */
  get busy(): string {
    return this._busy;
  }

  get notice(): INotice | null {
    return this._notice;
  }

  start(): void {
    this._stream.start();
  }

  updateSettings(settings: IPanelSettings): void {
    this._settings = settings;
    this._stream.setBackoff(this._backoff(settings));
    this._stream.setInterval(settings.refreshInterval);
    this._changed.emit();
  }

  dismissNotice(): void {
    this._notice = null;
    this._changed.emit();
  }

  say(notice: INotice): void {
    this._notice = notice;
    this._changed.emit();
  }

  /** Poll the hub now. Keeps the current notice: a refresh is not an answer to anything. */
  refresh(): Promise<boolean> {
    this._stream.refresh();
    return this._act('Refreshing', () => api.refresh(), false);
  }

  startLocal(sites: number): Promise<boolean> {
    return this._act(`Starting ${sites} sites`, () => api.startLocal(sites));
  }

  stopLocal(): Promise<boolean> {
    return this._act('Stopping the local federation', () => api.stopLocal());
  }

  connect(address: string): Promise<boolean> {
    const trimmed = address.trim();
    if (!/^[^\s:/]+:\d+$/.test(trimmed)) {
      this.say({ tone: 'error', text: 'Give the hub address as host:port, for example hub.example.org:9093.' });
      return Promise.resolve(false);
    }
    return this._act(`Connecting to ${trimmed}`, () => api.connect(trimmed));
  }

  disconnect(): Promise<boolean> {
    return this._act('Disconnecting', () => api.disconnect());
  }

  cancel(jobId: string): Promise<boolean> {
    return this._act(`Cancelling job ${jobId}`, () => api.cancel(jobId));
  }

  dispose(): void {
    this._stream.dispose();
    Signal.clearData(this);
  }

  private async _act(what: string, call: () => Promise<unknown>, clearNotice = true): Promise<boolean> {
    this._busy = what;
    if (clearNotice) {
      this._notice = null;
    }
    this._changed.emit();
    try {
      await call();
      return true;
    } catch (error) {
      const text = error instanceof Error ? error.message : String(error);
      this._notice = { tone: 'error', text };
      return false;
    } finally {
      this._busy = '';
      this._changed.emit();
    }
  }

  private _onMessage(message: StreamMessage): void {
    this._state = reduce(this._state, message);
    this._changed.emit();
  }

  private _backoff(settings: IPanelSettings): IBackoffOptions {
    return { initialMs: 1000, maxMs: Math.max(1, settings.maxReconnectDelay) * 1000, factor: 2, jitter: 0.2 };
  }

  private _settings: IPanelSettings;
  private _stream: EventStream;
  private _state: IPanelState = initialState();
  private _streamStatus: StreamStatus = { kind: 'connecting' };
  private _busy = '';
  private _notice: INotice | null = null;
  private _changed = new Signal<this, void>(this);
}
