/**
 * FLIP Lab for JupyterLab: a left side panel showing the federation, its sites and its jobs, and commands to
 * dispatch the current notebook's plan, start or stop the local federation, and refresh.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';

import { addCommands, CommandIDs, PALETTE_COMMANDS } from './commands';
import { DEFAULT_SETTINGS, IPanelSettings, PanelModel } from './model';
import { FlipLabPanel } from './panel';

const PLUGIN_ID = 'flip-lab:plugin';

function readSettings(settings: ISettingRegistry.ISettings): IPanelSettings {
  const get = <T>(key: string, fallback: T): T => {
    const value = settings.get(key).composite;
    return value === undefined || value === null ? fallback : (value as T);
  };
  return {
    defaultSites: get('defaultSites', DEFAULT_SETTINGS.defaultSites),
    defaultAddress: get('defaultAddress', DEFAULT_SETTINGS.defaultAddress),
    refreshInterval: get('refreshInterval', DEFAULT_SETTINGS.refreshInterval),
    metric: get('metric', DEFAULT_SETTINGS.metric),
    maxReconnectDelay: get('maxReconnectDelay', DEFAULT_SETTINGS.maxReconnectDelay)
  };
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'The FLIP Lab side panel and dispatch commands.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, ILayoutRestorer, ISettingRegistry],
  activate: async (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    settingRegistry: ISettingRegistry | null
  ): Promise<void> => {
    let settings: ISettingRegistry.ISettings | null = null;
    if (settingRegistry) {
      try {
        settings = await settingRegistry.load(PLUGIN_ID);
      } catch (reason) {
        console.warn('FLIP Lab: using default settings; the saved ones could not be read.', reason);
      }
    }
    const model = new PanelModel(settings ? readSettings(settings) : DEFAULT_SETTINGS);
    const panel = new FlipLabPanel(model, {
      dispatch: () => void app.commands.execute(CommandIDs.dispatch),
      openDashboard: jobId => void app.commands.execute(CommandIDs.openDashboard, { jobId })
    });
    app.shell.add(panel, 'left', { rank: 650 });
    if (restorer) {
      restorer.add(panel, 'flip-lab-panel');
    }
    addCommands({
      app,
      model,
      panel,
      tracker,
      runDashboard: () => (settings ? settings.get('runDashboardCell').composite !== false : true)
    });
    if (palette) {
      for (const command of PALETTE_COMMANDS) {
        palette.addItem({ command, category: 'FLIP Lab' });
      }
    }
    if (settings) {
      settings.changed.connect(() => model.updateSettings(readSettings(settings!)));
    }
    model.start();
  }
};

export default plugin;
