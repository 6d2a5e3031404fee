/**
 * The "GPU memory" sidebar: follows the active notebook and shows its latest
 * oomnb report, the ranked suggestions, and the peak of every measured cell.
 * Its data are the report outputs saved in the notebook model, so it works
 * live as cells run and is restored when a saved notebook is reopened.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Clipboard } from '@jupyterlab/apputils';
import {
  INotebookTracker,
  NotebookActions,
  NotebookPanel
} from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import {
  formatBytes,
  IFound,
  IHistoryPoint,
  INotebookState,
  MIME_TYPE,
  notebookState
} from './model';
import { el, renderReport, renderSuggestions } from './view';

/** Command ids, in one namespace. */
export namespace CommandIDs {
  export const show = 'oomnb:show-sidebar';
}

const SVG = 'http://www.w3.org/2000/svg';

/** A memory chip, in the theme's icon colour. */
export const gpuIcon = new LabIcon({
  name: 'oomnb:gpu',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<path d="M6 6h12v12H6z" fill-opacity=".25"/><path d="M9 2h2v3H9zm4 0h2v3h-2zM9 19h2v3H9zm4 0h2v3h-2zM2 9h3v2H2z' +
    'm0 4h3v2H2zm17-4h3v2h-3zm0 4h3v2h-3zM5 5h14v14H5zm2 2v10h10V7z"/></g></svg>'
});

/** Reports found in a notebook's outputs, with their cell positions. */
export function findReports(panel: NotebookPanel): IFound[] {
  const found: IFound[] = [];
  const cells = panel.content.model?.cells;
  if (!cells) {
    return found;
  }
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') {
      continue;
    }
    const outputs = (cell as any).outputs;
    for (let j = 0; j < outputs.length; j++) {
      const data = outputs.get(j).data;
      if (data && MIME_TYPE in data) {
        found.push({ cellIndex: i, data: data[MIME_TYPE] });
      }
    }
  }
  return found;
}

/** The sidebar widget. */
export class MemorySidebar extends Widget {
  constructor(private tracker: INotebookTracker) {
    super();
    this.id = 'oomnb-sidebar';
    this.title.caption = 'GPU memory';
    this.title.icon = gpuIcon;
    this.addClass('oomnb-sidebar');
    tracker.currentChanged.connect(this.follow, this);
    NotebookActions.executed.connect((_, args) => {
      if (args.notebook === this.panel?.content) {
        this.refresh();
      }
    });
    this.follow();
  }

  /** The notebook shown now. */
  panel: NotebookPanel | null = null;

  /** When the sidebar last drew a report (for the browser test's timing). */
  lastRenderedAt = 0;

  private follow(): void {
    const next = this.tracker.currentWidget;
    if (next === this.panel) {
      return;
    }
    if (this.panel) {
      this.panel.model?.contentChanged.disconnect(this.schedule, this);
    }
    this.panel = next;
    this.generation++;
    if (next) {
      void next.context.ready.then(() => {
        if (this.panel === next) {
          next.model?.contentChanged.connect(this.schedule, this);
          this.refresh();
        }
      });
    }
    this.refresh();
  }

  private generation = 0;
  private pending = 0;

  private schedule(): void {
    // Outputs change in bursts while a cell runs: draw once per burst, and
    // only for the notebook that asked (a late change from a notebook no
    // longer shown is ignored).
    const generation = this.generation;
    window.clearTimeout(this.pending);
    this.pending = window.setTimeout(() => {
      if (generation === this.generation) {
        this.refresh();
      }
    }, 30);
  }

  /** Redraw from the current notebook's outputs. */
  refresh(): void {
    const node = this.node;
    node.textContent = '';
    node.appendChild(el('h2', 'oomnb-title', 'GPU memory'));
    const panel = this.panel;
    const state: INotebookState = panel
      ? notebookState(findReports(panel))
      : { latest: null, latestCellIndex: null, history: [], errors: [] };
    for (const error of state.errors) {
      node.appendChild(el('div', 'oomnb-notice', error));
    }
    if (!state.latest) {
      const empty = el('div', 'oomnb-empty');
      empty.appendChild(
        el('p', undefined, 'No GPU memory report in this notebook yet.')
      );
      empty.appendChild(el('pre', 'oomnb-code', '%load_ext oomnb'));
      empty.appendChild(
        el(
          'p',
          undefined,
          'then put %%gpumem at the top of a cell (or run %gpumem auto on). Without a GPU, oomnb simulates one.'
        )
      );
      node.appendChild(empty);
      return;
    }
    node.appendChild(renderReport(state.latest));
    if (state.latest.suggestions.length) {
      node.appendChild(el('h3', 'oomnb-subtitle', 'Suggestions'));
      node.appendChild(
        renderSuggestions(state.latest.suggestions, {
          copy: code => Clipboard.copyToSystem(code),
          insert: code => this.insertBelow(code, state.latestCellIndex)
        })
      );
    }
    if (state.history.length) {
      node.appendChild(el('h3', 'oomnb-subtitle', 'Peak per measured cell'));
      node.appendChild(this.chart(state.history));
    }
    this.lastRenderedAt = performance.now();
    this.node.dataset.renderedAt = String(this.lastRenderedAt);
  }

  /** Insert a code cell with ``code`` below the report's cell; never run it. */
  insertBelow(code: string, cellIndex: number | null): void {
    const panel = this.panel;
    if (!panel) {
      return;
    }
    const notebook = panel.content;
    if (cellIndex !== null && cellIndex < notebook.widgets.length) {
      notebook.activeCellIndex = cellIndex;
    }
    NotebookActions.insertBelow(notebook);
    const cell = notebook.activeCell;
    if (cell) {
      cell.model.sharedModel.setSource(code);
    }
  }

  private chart(history: IHistoryPoint[]): Element {
    const width = 260;
    const height = 90;
    const pad = 6;
    const max = Math.max(...history.map(p => p.peakBytes), 1);
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('class', 'oomnb-chart');
    svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    const step = history.length > 1 ? (width - 2 * pad) / (history.length - 1) : 0;
    const points = history.map((p, i) => [
      pad + i * step,
      height - pad - ((height - 2 * pad) * p.peakBytes) / max
    ]);
    const line = document.createElementNS(SVG, 'polyline');
    line.setAttribute('points', points.map(([x, y]) => `${x},${y}`).join(' '));
    line.setAttribute('class', 'oomnb-chart-line');
    svg.appendChild(line);
    history.forEach((p, i) => {
      const dot = document.createElementNS(SVG, 'circle');
      dot.setAttribute('cx', String(points[i][0]));
      dot.setAttribute('cy', String(points[i][1]));
      dot.setAttribute('r', '4');
      dot.setAttribute('class', p.oom ? 'oomnb-dot oomnb-dot-oom' : 'oomnb-dot');
      const tip = document.createElementNS(SVG, 'title');
      tip.textContent = `cell [${p.executionCount ?? '-'}]: peak ${formatBytes(p.peakBytes)}${
        p.oom ? ' (out of memory)' : ''
      }`;
      dot.appendChild(tip);
      dot.addEventListener('click', () => this.scrollTo(p.cellIndex));
      svg.appendChild(dot);
    });
    return svg;
  }

  private scrollTo(cellIndex: number): void {
    const notebook = this.panel?.content;
    if (!notebook || cellIndex >= notebook.widgets.length) {
      return;
    }
    notebook.activeCellIndex = cellIndex;
    void notebook.scrollToItem(cellIndex);
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'oomnb:sidebar',
  description: 'The GPU memory sidebar for oomnb reports.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILabShell],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker) => {
    const sidebar = new MemorySidebar(tracker);
    app.shell.add(sidebar, 'right', { rank: 600 });
    app.commands.addCommand(CommandIDs.show, {
      label: 'Show GPU memory',
      execute: () => app.shell.activateById(sidebar.id)
    });
  }
};

export default plugin;
