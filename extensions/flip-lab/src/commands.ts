/**
 * The panel's commands: in the palette, the notebook toolbar and the notebook context menu (both declared in
 * schema/plugin.json), and behind the panel's own buttons.
 */
import { JupyterFrontEnd } from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';

import { dashboardCode, dispatchCode } from './format';
import { flipIcon } from './icon';
import { insertCell, runInKernel } from './kernel';
import { PanelModel } from './model';
import { FlipLabPanel } from './panel';

export const CommandIDs = {
  open: 'flip-lab:open',
  dispatch: 'flip-lab:dispatch',
  startLocal: 'flip-lab:start-local',
  stopLocal: 'flip-lab:stop-local',
  refresh: 'flip-lab:refresh',
  openDashboard: 'flip-lab:open-dashboard'
};

export const PALETTE_COMMANDS = [
  CommandIDs.open,
  CommandIDs.dispatch,
  CommandIDs.startLocal,
  CommandIDs.stopLocal,
  CommandIDs.refresh
];

export interface ICommandContext {
  app: JupyterFrontEnd;
  model: PanelModel;
  panel: FlipLabPanel;
  tracker: INotebookTracker;
  /** Whether "Open dashboard" runs the cell it inserts (a setting). */
  runDashboard: () => boolean;
}

function complain(model: PanelModel, text: string): void {
  model.say({ tone: 'error', text });
  Notification.error(text, { autoClose: 8000 });
}

export function addCommands(ctx: ICommandContext): void {
  const { app, model, panel, tracker } = ctx;
  const state = () => model.state.connection.state;

  app.commands.addCommand(CommandIDs.open, {
    label: 'Show FLIP Lab Panel',
    caption: 'Show the federation, its sites and jobs',
    icon: flipIcon,
    execute: () => app.shell.activateById(panel.id)
  });

  app.commands.addCommand(CommandIDs.dispatch, {
    label: 'Dispatch Plan to Federation',
    caption: "Send this notebook's flip_lab.Plan to the federation shown in the FLIP Lab panel",
    icon: flipIcon,
    isEnabled: () => tracker.currentWidget !== null,
    execute: async () => {
      const notebook = tracker.currentWidget;
      if (!notebook) {
        complain(model, 'Open the notebook that defines the plan, then dispatch it.');
        return;
      }
      const code = dispatchCode(model.state.connection);
      if (state() !== 'connected' || code === null) {
        app.shell.activateById(panel.id);
        complain(model, 'Connect the FLIP Lab panel to a federation first: start the local federation or connect to a hub.');
        return;
      }
      model.say({ tone: 'ok', text: `Dispatching the plan in ${notebook.title.label} ...` });
      const outcome = await runInKernel(notebook, code);
      if (outcome.ok) {
        const text = outcome.text || 'The plan was dispatched.';
        model.say({ tone: 'ok', text });
        Notification.success(text, { autoClose: 6000 });
        void model.refresh();
      } else {
        complain(model, `The plan was not dispatched: ${outcome.text}`);
      }
    }
  });

  app.commands.addCommand(CommandIDs.startLocal, {
    label: args => (args.sites ? `Start Local Federation (${args.sites} sites)` : 'Start Local Federation'),
    caption: 'Start a hub and simulated hospitals on this machine',
    isEnabled: () => ['disconnected', 'stopped', 'failed'].includes(state()),
    execute: async args => {
      app.shell.activateById(panel.id);
      const sites = Number(args.sites ?? model.settings.defaultSites);
      await model.startLocal(sites);
    }
  });

  app.commands.addCommand(CommandIDs.stopLocal, {
    label: 'Stop Local Federation',
    caption: 'Stop the hub and every simulated site, by process id',
    isEnabled: () => model.state.connection.kind === 'local' && state() !== 'stopping',
    execute: async () => {
      await model.stopLocal();
    }
  });

  app.commands.addCommand(CommandIDs.refresh, {
    label: 'Refresh FLIP Lab Panel',
    caption: 'Ask the hub for its sites and jobs now',
    execute: async () => {
      await model.refresh();
    }
  });

  app.commands.addCommand(CommandIDs.openDashboard, {
    label: args => `Open Dashboard of Job ${args.jobId ?? ''}`.trim(),
    caption: 'Insert a cell that shows the job in the current notebook',
    execute: async args => {
      const jobId = String(args.jobId ?? '');
      const notebook = tracker.currentWidget;
      if (!notebook) {
        complain(model, `Open a notebook to show the dashboard of job ${jobId} in it.`);
        return;
      }
      const code = dashboardCode(model.state.connection, jobId);
      if (code === null) {
        complain(model, 'Connect the FLIP Lab panel to the job\'s federation first.');
        return;
      }
      app.shell.activateById(notebook.id);
      await insertCell(notebook, code, ctx.runDashboard());
    }
  });

  // Commands are enabled or not by the connection and the current notebook; menus and toolbars ask again.
  let last = `${state()} ${model.state.connection.kind}`;
  model.changed.connect(() => {
    const now = `${state()} ${model.state.connection.kind}`;
    if (now !== last) {
      last = now;
      app.commands.notifyCommandChanged();
    }
  });
  tracker.currentChanged.connect(() => app.commands.notifyCommandChanged());
}
