/**
 * REST calls to the FLIP Lab server extension. Every failure becomes a `PanelRequestError` whose message is
 * a sentence for a person (the server's own `message`, never a traceback).
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IConnectionInfo, IJobSummary } from './types';

export class PanelRequestError extends Error {}

async function request<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'flip-lab', 'api', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch {
    throw new PanelRequestError(
      'The Jupyter server did not answer; it may be restarting. Try again in a moment.'
    );
  }
  const text = await response.text();
  let body: any = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message =
      body && typeof body.message === 'string' && body.message
        ? body.message
        : `The Jupyter server refused the request (HTTP ${response.status}).`;
    throw new PanelRequestError(message);
  }
  return body as T;
}

function post<T>(path: string, body: unknown = {}): Promise<T> {
  return request<T>(path, { method: 'POST', body: JSON.stringify(body) });
}

export const api = {
  refresh: (): Promise<unknown> => post('refresh'),
  connect: (address: string): Promise<IConnectionInfo> => post('connect', { address }),
  disconnect: (): Promise<IConnectionInfo> => post('disconnect'),
  startLocal: (sites: number): Promise<IConnectionInfo> => post('local', { sites }),
  stopLocal: (): Promise<IConnectionInfo> => request('local', { method: 'DELETE' }),
  cancel: (jobId: string): Promise<IJobSummary> =>
    post(`jobs/${encodeURIComponent(jobId)}/cancel`)
};
