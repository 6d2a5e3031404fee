/**
 * Activation: the sidebar in the right area, a command to show it, and a
 * toolbar button on every notebook so it is one click away in JupyterLab and
 * in Notebook 7 (whose right area has no tab bar of its own).
 */
import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ToolbarButton } from '@jupyterlab/ui-components';

import { gpuIcon, MemorySidebar } from './sidebar';

/** Command ids, in one namespace. */
export namespace CommandIDs {
  export const show = 'oomnb:show-sidebar';
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'oomnb:sidebar',
  description: 'The GPU memory sidebar for oomnb reports.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null
  ) => {
    const sidebar = new MemorySidebar(tracker);
    app.shell.add(sidebar, 'right', { rank: 600 });
    app.commands.addCommand(CommandIDs.show, {
      label: 'Show GPU Memory',
      caption: 'Show the oomnb GPU memory sidebar',
      icon: gpuIcon,
      execute: () => app.shell.activateById(sidebar.id)
    });
    if (palette) {
      palette.addItem({ command: CommandIDs.show, category: 'oomnb' });
    }
    tracker.widgetAdded.connect((_, panel) => {
      const button = new ToolbarButton({
        icon: gpuIcon,
        tooltip: 'GPU memory (oomnb)',
        className: 'oomnb-toolbar-button',
        onClick: () => void app.commands.execute(CommandIDs.show)
      });
      panel.toolbar.insertItem(10, 'oomnb-gpu-memory', button);
    });
  }
};

export default plugin;
