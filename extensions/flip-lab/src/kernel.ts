/**
 * Running the panel's snippets in a notebook: the dispatch call in the notebook's own kernel (where the plan
 * lives), and the dashboard cell inserted below the active cell.
 */
import { KernelMessage } from '@jupyterlab/services';
import { NotebookActions, NotebookPanel } from '@jupyterlab/notebook';

export interface IKernelOutcome {
  ok: boolean;
  /** What the code printed (on success) or the error's name and value (on failure): never a traceback. */
  text: string;
}

export async function runInKernel(panel: NotebookPanel, code: string): Promise<IKernelOutcome> {
  const kernel = panel.sessionContext.session?.kernel;
  if (!kernel) {
    return {
      ok: false,
      text: 'this notebook has no running kernel. Start one, run the cells that define the plan, and dispatch again.'
    };
  }
  const future = kernel.requestExecute({
    code,
    silent: false,
    store_history: false,
    allow_stdin: false,
    stop_on_error: false
  });
  let printed = '';
  let error = '';
  future.onIOPub = message => {
    if (KernelMessage.isStreamMsg(message)) {
      printed += message.content.text;
    } else if (KernelMessage.isErrorMsg(message)) {
      error = `${message.content.ename}: ${message.content.evalue}`;
    }
  };
  try {
    const reply = await future.done;
    if (reply.content.status !== 'ok' || error) {
      return { ok: false, text: error || 'the kernel could not run the dispatch.' };
    }
  } catch {
    return { ok: false, text: 'the kernel stopped or restarted before the dispatch finished.' };
  }
  return { ok: true, text: printed.trim() };
}

/** Insert `code` as a new cell below the active one and optionally run it. */
export async function insertCell(panel: NotebookPanel, code: string, run: boolean): Promise<void> {
  const notebook = panel.content;
  NotebookActions.insertBelow(notebook);
  const cell = notebook.activeCell;
  if (!cell) {
    return;
  }
  cell.model.sharedModel.setSource(code);
  if (run) {
    await NotebookActions.run(notebook, panel.sessionContext);
  }
}
