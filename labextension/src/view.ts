/**
 * DOM for reports: every string from the JSON goes in with textContent,
 * never as HTML, so a variable named `<img src=x onerror=...>` is text.
 */
import {
  failure,
  formatBytes,
  headline,
  IReport,
  ISuggestion,
  recovered,
  story
} from './model';

/** Create an element with a class and, optionally, text. */
export function el(
  tag: string,
  className?: string,
  text?: string
): HTMLElement {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/** The device line, the memory bar and the figures of one report. */
export function renderReport(report: IReport): HTMLElement {
  const root = el('div', 'oomnb-report');
  const head = el('div', 'oomnb-device');
  const kind = report.device.kind === 'simulated' ? 'simulated' : 'CUDA';
  head.appendChild(el('span', 'oomnb-device-name', report.device.name));
  head.appendChild(
    el('span', `oomnb-badge oomnb-badge-${report.device.kind}`, kind)
  );
  const cap = report.device.capacity_bytes;
  head.appendChild(
    el('span', 'oomnb-capacity', cap !== null ? formatBytes(cap) : 'no limit')
  );
  if (report.dry_run) {
    head.appendChild(el('span', 'oomnb-badge', 'dry run'));
  }
  root.appendChild(head);

  const scale = Math.max(
    cap ?? 0,
    report.peak_bytes + (report.oom?.requested_bytes ?? 0),
    1
  );
  const bar = el('div', 'oomnb-bar');
  const pct = (value: number): string => `${(100 * value) / scale}%`;
  const peak = el('div', 'oomnb-bar-peak');
  peak.style.width = pct(report.peak_bytes);
  peak.title = `peak ${formatBytes(report.peak_bytes)}`;
  const base = el('div', 'oomnb-bar-baseline');
  base.style.width = pct(report.baseline_bytes);
  base.title = `baseline ${formatBytes(report.baseline_bytes)}`;
  bar.append(peak, base);
  if (report.oom && report.oom.requested_bytes) {
    const failed = el('div', 'oomnb-bar-request');
    failed.style.left = pct(report.peak_bytes);
    failed.style.width = pct(report.oom.requested_bytes);
    failed.title = `failed request ${formatBytes(report.oom.requested_bytes)}`;
    bar.appendChild(failed);
  }
  if (cap !== null) {
    const line = el('div', 'oomnb-bar-capacity');
    line.style.left = pct(cap);
    bar.appendChild(line);
  }
  root.appendChild(bar);

  const figures = el('dl', 'oomnb-figures');
  const add = (label: string, value: string): void => {
    figures.append(el('dt', undefined, label), el('dd', undefined, value));
  };
  add('cell', report.cell === null ? '-' : `[${report.cell}]`);
  add('baseline', formatBytes(report.baseline_bytes));
  add('peak', formatBytes(report.peak_bytes));
  add(
    'delta',
    (report.delta_bytes > 0 ? '+' : '') + formatBytes(report.delta_bytes)
  );
  add('reserved', formatBytes(report.reserved_bytes));
  add('free now', formatBytes(report.free_bytes));
  add('duration', `${report.duration_s.toFixed(3)} s`);
  if (report.batch_var) {
    add(report.batch_var.name, String(report.batch_var.value));
  }
  root.appendChild(figures);

  if (report.oom) {
    root.appendChild(renderOom(report));
  }
  for (const note of report.notes ?? []) {
    root.appendChild(el('div', 'oomnb-note', note));
  }
  return root;
}

/** The OOM box: the story, why, what recovery did, and the error's own words one click away. */
export function renderOom(report: IReport): HTMLElement {
  const oom = el('div', 'oomnb-oom');
  const title = el(
    'div',
    'oomnb-oom-title',
    `Out of memory (${failure(report)})`
  );
  const told = story(report);
  if (told) {
    title.appendChild(document.createTextNode(': '));
    title.appendChild(el('span', 'oomnb-story', told));
  }
  oom.appendChild(title);
  if (report.oom?.diagnosis) {
    oom.appendChild(el('div', 'oomnb-oom-diagnosis', report.oom.diagnosis));
  }
  oom.appendChild(el('div', 'oomnb-recovered', recovered(report)));
  const message = el('details', 'oomnb-message');
  message.appendChild(el('summary', undefined, 'error message'));
  message.appendChild(el('pre', 'oomnb-code', report.oom?.message ?? ''));
  oom.appendChild(message);
  return oom;
}

/**
 * Auto mode's compact form: one line (and the OOM's story) that opens to the
 * whole report, as the HTML fallback does.
 */
export function renderCompact(
  report: IReport,
  full: () => HTMLElement
): HTMLElement {
  if (!report.oom) {
    return el('div', 'oomnb-compact oomnb-headline', headline(report));
  }
  const box = el('details', 'oomnb-compact') as HTMLDetailsElement;
  const summary = el('summary');
  summary.appendChild(el('span', 'oomnb-headline', headline(report)));
  summary.appendChild(
    el('div', 'oomnb-story', `${failure(report)}: ${story(report)}`)
  );
  box.appendChild(summary);
  box.addEventListener('toggle', () => {
    if (box.open && box.childElementCount === 1) {
      box.appendChild(full());
    }
  });
  return box;
}

/** Where a suggestion's code goes, in the words of the Python renderings. */
const APPLY_WORDS: Record<string, string> = {
  replace_cell: 'instead of the cell:',
  run_first: 'run once, then the cell again:',
  setup: 'in the set-up (a restart or a new install):'
};

/** Actions a suggestion offers. */
export interface ISuggestionActions {
  copy(code: string): void;
  insert(code: string): void;
}

/** The ranked suggestions, each with its saving, source and code. */
export function renderSuggestions(
  suggestions: ISuggestion[],
  actions?: ISuggestionActions
): HTMLElement {
  const list = el('ol', 'oomnb-suggestions');
  for (const suggestion of suggestions) {
    const item = el('li', 'oomnb-suggestion');
    item.dataset.kind = suggestion.kind;
    item.appendChild(el('div', 'oomnb-suggestion-title', suggestion.title));
    const saves =
      suggestion.saves_bytes !== null && suggestion.saves_bytes > 0
        ? `saves ${formatBytes(suggestion.saves_bytes)}`
        : 'saving unknown';
    const fits =
      suggestion.fits === true
        ? ' · fits'
        : suggestion.fits === false
          ? ' · not enough alone'
          : '';
    item.appendChild(
      el(
        'div',
        'oomnb-suggestion-meta',
        `${saves} · ${suggestion.source} · ${suggestion.kind}${fits}`
      )
    );
    item.appendChild(el('div', 'oomnb-suggestion-detail', suggestion.detail));
    if (suggestion.code) {
      item.appendChild(
        el('div', 'oomnb-apply', APPLY_WORDS[suggestion.apply ?? 'run_first'])
      );
      item.appendChild(el('pre', 'oomnb-code', suggestion.code));
      if (actions) {
        const buttons = el('div', 'oomnb-buttons');
        const copy = el('button', 'jp-Button oomnb-copy', 'Copy');
        copy.addEventListener('click', () => actions.copy(suggestion.code));
        const insert = el(
          'button',
          'jp-Button oomnb-insert',
          'Insert cell below'
        );
        insert.addEventListener('click', () => actions.insert(suggestion.code));
        buttons.append(copy, insert);
        item.appendChild(buttons);
      }
    }
    list.appendChild(item);
  }
  return list;
}
