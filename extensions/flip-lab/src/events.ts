/**
 * The live event stream from the server extension over one WebSocket. When the socket closes (the server
 * restarted, the network dropped) it reconnects by itself with capped exponential backoff; the snapshot
 * the server sends on every connect brings the panel back up to date.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';

import { backoffDelay, DEFAULT_BACKOFF, IBackoffOptions } from './backoff';
import { StreamMessage, StreamStatus } from './types';

export interface IEventStreamOptions {
  onMessage: (message: StreamMessage) => void;
  onStatus: (status: StreamStatus) => void;
  /** Seconds between the server's checks of sites and jobs for this panel. */
  intervalSeconds: number;
  backoff?: IBackoffOptions;
}

export class EventStream implements IDisposable {
  constructor(private options: IEventStreamOptions) {}

  get isDisposed(): boolean {
    return this._disposed;
  }

  start(): void {
    this._open();
  }

  /** Ask the server to poll the hub now (e.g. right after a dispatch). */
  refresh(): void {
    if (this._socket && this._socket.readyState === WebSocket.OPEN) {
      this._socket.send('refresh');
    }
  }

  /** Use another poll interval; takes effect by reconnecting. */
  setInterval(seconds: number): void {
    if (seconds === this.options.intervalSeconds) {
      return;
    }
    this.options.intervalSeconds = seconds;
    if (this._socket) {
      this._reopen = true;
      this._socket.close();
    }
  }

  setBackoff(backoff: IBackoffOptions): void {
    this.options.backoff = backoff;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    clearTimeout(this._timer);
    if (this._socket) {
      this._socket.onclose = null;
      this._socket.close();
    }
  }

  private _open(): void {
    if (this._disposed) {
      return;
    }
    const settings = ServerConnection.makeSettings();
    let url =
      URLExt.join(settings.wsUrl, 'flip-lab', 'api', 'events') +
      `?interval=${encodeURIComponent(String(this.options.intervalSeconds))}`;
    if (settings.token) {
      url += `&token=${encodeURIComponent(settings.token)}`;
    }
    this.options.onStatus(this._attempt === 0 ? { kind: 'connecting' } : this._reconnecting());
    let socket: WebSocket;
    try {
      socket = new settings.WebSocket(url);
    } catch {
      this._scheduleReconnect();
      return;
    }
    this._socket = socket;
    socket.onopen = () => {
      this._attempt = 0;
      this.options.onStatus({ kind: 'live' });
    };
    socket.onmessage = event => {
      let message: StreamMessage;
      try {
        message = JSON.parse(String(event.data));
      } catch {
        return; // not ours to show; the next snapshot puts things right
      }
      this.options.onMessage(message);
    };
    // A failed or dropped socket always ends in `close`; that is where the retry is scheduled.
    socket.onerror = () => undefined;
    socket.onclose = () => {
      if (this._socket === socket) {
        this._socket = null;
      }
      if (this._reopen) {
        this._reopen = false;
        this._open();
        return;
      }
      this._scheduleReconnect();
    };
  }

  private _reconnecting(): StreamStatus {
    return { kind: 'reconnecting', attempt: this._attempt, delayMs: this._delay };
  }

  private _scheduleReconnect(): void {
    if (this._disposed) {
      return;
    }
    this._attempt += 1;
    this._delay = backoffDelay(this._attempt, this.options.backoff ?? DEFAULT_BACKOFF);
    this.options.onStatus(this._reconnecting());
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._open(), this._delay);
  }

  private _socket: WebSocket | null = null;
  private _attempt = 0;
  private _delay = 0;
  private _timer: ReturnType<typeof setTimeout> | undefined;
  private _disposed = false;
  private _reopen = false;
}
