/**
 * The report contract (application/vnd.oomnb.report+json, schema_version 1)
 * and the pure functions the sidebar is built on. Nothing here touches the
 * DOM or JupyterLab, so it is tested with Jest on its own.
 */

/** The MIME type every oomnb report is published with. */
export const MIME_TYPE = 'application/vnd.oomnb.report+json';

/** The report schema version this extension reads. */
export const SCHEMA_VERSION = 1;

/** Which device a report is about. */
export interface IDevice {
  kind: 'cuda' | 'simulated';
  name: string;
  index: number;
  capacity_bytes: number | null;
  card?: string | null;
}

/** What an out-of-memory error said. */
export interface IOom {
  requested_bytes: number | null;
  free_bytes: number | null;
  capacity_bytes: number | null;
  message: string;
  over_bytes?: number | null;
  diagnosis?: string;
  exception_type?: string;
}

/** The vocabulary of suggestion kinds: the JSON Schema's enum (a test checks they agree). */
export const SUGGESTION_KINDS = [
  'batch_size',
  'mixed_precision',
  'gradient_checkpointing',
  'gradient_accumulation',
  'free_references',
  'no_grad',
  'clear_output_cache',
  'clear_traceback',
  'expandable_segments',
  'quantization',
  'optimizer',
  'input_size',
  'sharding',
  'device_map',
  'combination'
] as const;
export type SuggestionKind = (typeof SUGGESTION_KINDS)[number];

/** How a suggestion's code is applied (the JSON Schema's enum). */
export const SUGGESTION_APPLIES = ['replace_cell', 'run_first', 'setup'] as const;

/** One change that would make the cell fit. */
export interface ISuggestion {
  kind: SuggestionKind;
  title: string;
  detail: string;
  saves_bytes: number | null;
  params: Record<string, unknown>;
  code: string;
  source: 'dry-run' | 'measured' | 'rule';
  fits?: boolean | null;
  apply?: (typeof SUGGESTION_APPLIES)[number];
}

/** A report, as validated. */
export interface IReport {
  schema_version: number;
  cell: number | null;
  source?: string;
  device: IDevice;
  baseline_bytes: number;
  end_bytes: number;
  delta_bytes: number;
  peak_bytes: number;
  reserved_bytes: number;
  free_bytes?: number | null;
  duration_s: number;
  batch_var: { name: string; value: unknown } | null;
  oom: IOom | null;
  recovered_bytes: number;
  released_names?: string[];
  suggestions: ISuggestion[];
  dry_run?: boolean;
}

/** The outcome of reading one output's JSON. */
export interface IParsed {
  report?: IReport;
  error?: string;
}

const SOURCES = ['dry-run', 'measured', 'rule'];

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isCount(value: unknown): boolean {
  return typeof value === 'number' && Number.isFinite(value);
}

function isCountOrNull(value: unknown): boolean {
  return value === null || isCount(value);
}

/**
 * Validate one report's JSON. A report with an unknown schema_version or
 * malformed fields gives a one-line error instead of a report.
 */
export function parseReport(data: unknown): IParsed {
  if (!isObject(data)) {
    return { error: 'oomnb report: not a JSON object' };
  }
  if (data.schema_version !== SCHEMA_VERSION) {
    return {
      error: `oomnb report with schema_version ${JSON.stringify(
        data.schema_version
      )}: this sidebar reads version ${SCHEMA_VERSION}; update the extension`
    };
  }
  const device = data.device;
  if (
    !isObject(device) ||
    (device.kind !== 'cuda' && device.kind !== 'simulated') ||
    typeof device.name !== 'string' ||
    !isCountOrNull(device.capacity_bytes)
  ) {
    return { error: 'oomnb report: malformed "device"' };
  }
  for (const key of [
    'baseline_bytes',
    'end_bytes',
    'delta_bytes',
    'peak_bytes',
    'reserved_bytes',
    'duration_s',
    'recovered_bytes'
  ]) {
    if (!isCount(data[key])) {
      return { error: `oomnb report: "${key}" is not a number` };
    }
  }
  if (!isCountOrNull(data.cell)) {
    return { error: 'oomnb report: "cell" is not a number' };
  }
  const oom = data.oom;
  if (
    oom !== null &&
    (!isObject(oom) ||
      typeof oom.message !== 'string' ||
      !isCountOrNull(oom.requested_bytes) ||
      !isCountOrNull(oom.free_bytes))
  ) {
    return { error: 'oomnb report: malformed "oom"' };
  }
  if (!Array.isArray(data.suggestions)) {
    return { error: 'oomnb report: "suggestions" is not a list' };
  }
  for (const s of data.suggestions) {
    if (
      !isObject(s) ||
      !(SUGGESTION_KINDS as readonly unknown[]).includes(s.kind) ||
      (s.apply !== undefined && !(SUGGESTION_APPLIES as readonly unknown[]).includes(s.apply)) ||
      typeof s.title !== 'string' ||
      typeof s.detail !== 'string' ||
      typeof s.code !== 'string' ||
      !isCountOrNull(s.saves_bytes) ||
      !SOURCES.includes(s.source as string)
    ) {
      return { error: 'oomnb report: malformed suggestion' };
    }
  }
  return { report: data as unknown as IReport };
}

/** One measured cell in the notebook, for the peak chart. */
export interface IHistoryPoint {
  /** Position of the cell in the notebook. */
  cellIndex: number;
  /** Execution count of the report. */
  executionCount: number | null;
  peakBytes: number;
  oom: boolean;
}

/** A report found in a notebook's outputs. */
export interface IFound {
  cellIndex: number;
  data: unknown;
}

/** What the sidebar shows for a notebook: its latest report and the per-cell history. */
export interface INotebookState {
  latest: IReport | null;
  latestCellIndex: number | null;
  history: IHistoryPoint[];
  errors: string[];
}

/**
 * Read every report found in a notebook's outputs. The latest report is the
 * one with the highest execution count (the last to run, wherever it sits);
 * the history has one point per cell, in notebook order.
 */
export function notebookState(found: IFound[]): INotebookState {
  const state: INotebookState = {
    latest: null,
    latestCellIndex: null,
    history: [],
    errors: []
  };
  const byCell = new Map<number, IReport>();
  for (const item of found) {
    const parsed = parseReport(item.data);
    if (parsed.error !== undefined) {
      if (!state.errors.includes(parsed.error)) {
        state.errors.push(parsed.error);
      }
      continue;
    }
    const report = parsed.report as IReport;
    byCell.set(item.cellIndex, report);
    const newer =
      state.latest === null ||
      (report.cell ?? -1) >= (state.latest.cell ?? -1);
    if (newer) {
      state.latest = report;
      state.latestCellIndex = item.cellIndex;
    }
  }
  state.history = [...byCell.entries()]
    .sort((a, b) => a[0] - b[0])
    .map(([cellIndex, report]) => ({
      cellIndex,
      executionCount: report.cell,
      peakBytes: report.peak_bytes,
      oom: report.oom !== null
    }));
  return state;
}

/** Bytes as the Python side writes them: 4096 -> "4.00 KiB". */
export function formatBytes(value: number | null | undefined): string {
  if (value === null || value === undefined) {
    return 'unknown';
  }
  const sign = value < 0 ? '-' : '';
  let rest = Math.abs(value);
  if (rest < 1024) {
    return `${sign}${Math.round(rest)} B`;
  }
  for (const unit of ['KiB', 'MiB', 'GiB']) {
    rest /= 1024;
    if (rest < 1024) {
      return `${sign}${rest.toFixed(2)} ${unit}`;
    }
  }
  return `${sign}${(rest / 1024).toFixed(2)} TiB`;
}
