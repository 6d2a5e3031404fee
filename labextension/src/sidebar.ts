/**
 * The "GPU memory" sidebar: the active notebook's latest oomnb report (the
 * one that arrived last, see `ReportLog`), its ranked suggestions, and the
 * peak of every cell measured in the current kernel session.
 *
 * Its data are the report outputs in the notebook model, so it follows
 * cells as they run (in `%%gpumem` or auto mode) and shows the last saved
 * report when a saved notebook is opened.
 */
import { Clipboard } from '@jupyterlab/apputils';
import {
  INotebookTracker,
  NotebookActions,
  NotebookPanel
} from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { peakChart } from './chart';
import { EMPTY_STATE, INotebookState, ReportLog } from './model';
import { findReports, loadsOomnb } from './notebook';
import { el, renderReport, renderSuggestions } from './view';

/** A memory chip, in the theme's icon colour. */
export const gpuIcon = new LabIcon({
  name: 'oomnb:gpu',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<path d="M6 6h12v12H6z" fill-opacity=".25"/><path d="M9 2h2v3H9zm4 0h2v3h-2zM9 19h2v3H9zm4 0h2v3h-2zM2 9h3v2H2z' +
    'm0 4h3v2H2zm17-4h3v2h-3zm0 4h3v2h-3zM5 5h14v14H5zm2 2v10h10V7z"/></g></svg>'
});

/** What the sidebar keeps for each open notebook. */
interface ITracked {
  log: ReportLog;
  /** oomnb was loaded by a cell run in this kernel session. */
  loaded: boolean;
}

/** The sidebar widget. */
export class MemorySidebar extends Widget {
  constructor(private tracker: INotebookTracker) {
    super();
    this.id = 'oomnb-sidebar';
    this.title.caption = 'GPU memory';
    this.title.icon = gpuIcon;
    this.addClass('oomnb-sidebar');
    tracker.widgetAdded.connect((_, panel) => this.track(panel));
    tracker.forEach(panel => this.track(panel));
    tracker.currentChanged.connect(this.follow, this);
    NotebookActions.executed.connect((_, args) => {
      const panel = this.panelOf(args.notebook);
      const tracked = panel ? this.notebooks.get(panel) : undefined;
      if (panel && tracked) {
        if (
          args.success &&
          loadsOomnb(args.cell.model.sharedModel.getSource())
        ) {
          tracked.loaded = true;
        }
        this.readNotebook(panel);
      }
    });
    this.follow();
  }

  /** The notebook shown now. */
  panel: NotebookPanel | null = null;

  /** When the sidebar last drew a report (the browser test reads it). */
  lastRenderedAt = 0;

  private notebooks = new WeakMap<NotebookPanel, ITracked>();
  private drawn = '';
  private pending = 0;

  private panelOf(notebook: unknown): NotebookPanel | null {
    let found: NotebookPanel | null = null;
    this.tracker.forEach(panel => {
      if (panel.content === notebook) {
        found = panel;
      }
    });
    return found;
  }

  /** Start following a notebook's outputs and kernel, shown or not. */
  private track(panel: NotebookPanel): void {
    if (this.notebooks.has(panel)) {
      return;
    }
    const tracked: ITracked = { log: new ReportLog(), loaded: false };
    this.notebooks.set(panel, tracked);
    void panel.context.ready.then(() => {
      // Saved outputs arrive first, in document order.
      tracked.log.read(findReports(panel));
      panel.model?.contentChanged.connect(() => this.schedule(panel));
      this.readNotebook(panel);
    });
    const restart = (): void => {
      tracked.log.newSession();
      tracked.loaded = false;
      this.readNotebook(panel);
    };
    panel.sessionContext.kernelChanged.connect((_, change) => {
      // The first kernel of an opened notebook is not a new session; another kernel is.
      if (change.oldValue) {
        restart();
      }
    });
    panel.sessionContext.statusChanged.connect((_, status) => {
      if (status === 'restarting' || status === 'autorestarting') {
        restart();
      }
    });
  }

  private follow(): void {
    const next = this.tracker.currentWidget;
    if (next === this.panel) {
      return;
    }
    this.panel = next;
    this.drawn = '';
    if (next) {
      this.track(next);
    }
    this.refresh();
  }

  private schedule(panel: NotebookPanel): void {
    // Outputs change in bursts while a cell runs: read once per burst. Edits
    // change the content too; they end in `readNotebook`, which redraws nothing
    // when what the sidebar shows did not change.
    window.clearTimeout(this.pending);
    this.pending = window.setTimeout(() => this.readNotebook(panel), 30);
  }

  /** Read a notebook's outputs (so arrivals are counted while it is not shown); redraw if it is shown. */
  private readNotebook(panel: NotebookPanel): void {
    const tracked = this.notebooks.get(panel);
    if (!tracked || !panel.context.isReady) {
      // Before the file is read, its outputs are not there: reading now would
      // take the saved reports for new ones.
      if (panel === this.panel) {
        this.draw(EMPTY_STATE, false);
      }
      return;
    }
    const state = tracked.log.read(findReports(panel));
    if (panel === this.panel) {
      this.draw(state, tracked.loaded);
    }
  }

  /** Redraw from the current notebook's outputs. */
  refresh(): void {
    this.drawn = '';
    if (this.panel && this.notebooks.has(this.panel)) {
      this.readNotebook(this.panel);
    } else {
      this.draw(EMPTY_STATE, false);
    }
  }

  private draw(state: INotebookState, loaded: boolean): void {
    const signature = JSON.stringify([
      state.latestArrival,
      state.latestCellIndex,
      state.history,
      state.historySaved,
      state.errors,
      loaded
    ]);
    if (signature === this.drawn) {
      return;
    }
    this.drawn = signature;
    const node = this.node;
    node.textContent = '';
    node.appendChild(el('h2', 'oomnb-title', 'GPU memory'));
    for (const error of state.errors) {
      node.appendChild(el('div', 'oomnb-notice', error));
    }
    if (!state.latest) {
      node.appendChild(this.empty(loaded));
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
      node.appendChild(
        el(
          'h3',
          'oomnb-subtitle',
          state.historySaved
            ? 'Peak per measured cell (as saved)'
            : 'Peak per measured cell (this kernel session)'
        )
      );
      node.appendChild(peakChart(state.history, i => this.scrollTo(i)));
    }
    this.lastRenderedAt = performance.now();
    this.node.dataset.renderedAt = String(this.lastRenderedAt);
    this.node.dataset.latestCell = String(state.latest.cell ?? '');
  }

  private empty(loaded: boolean): HTMLElement {
    const empty = el('div', 'oomnb-empty');
    empty.appendChild(
      el('p', undefined, 'No GPU memory report in this notebook yet.')
    );
    if (!loaded) {
      empty.appendChild(el('p', undefined, 'Load oomnb once per kernel:'));
      empty.appendChild(el('pre', 'oomnb-code', '%load_ext oomnb'));
    }
    empty.appendChild(
      el(
        'p',
        undefined,
        (loaded ? 'oomnb is loaded. ' : '') +
          'Put %%gpumem at the top of a cell to measure it, or run this once to measure every cell:'
      )
    );
    empty.appendChild(el('pre', 'oomnb-code', '%gpumem auto on'));
    empty.appendChild(
      el(
        'p',
        undefined,
        'Reports appear here as cells run. Without a GPU, oomnb simulates one.'
      )
    );
    return empty;
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

  private scrollTo(cellIndex: number): void {
    const notebook = this.panel?.content;
    if (!notebook || cellIndex >= notebook.widgets.length) {
      return;
    }
    notebook.activeCellIndex = cellIndex;
    void notebook.scrollToItem(cellIndex);
  }
}
