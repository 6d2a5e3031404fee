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
  /** The story: the device total the cell needs, what the device has for it. */
  needs_bytes?: number | null;
  has_bytes?: number | null;
  needs_at_least?: boolean;
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
export const SUGGESTION_APPLIES = [
  'replace_cell',
  'run_first',
  'setup'
] as const;

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
  notes?: string[];
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
      !isCountOrNull(oom.free_bytes) ||
      !isCountOrNull(oom.needs_bytes ?? null) ||
      !isCountOrNull(oom.has_bytes ?? null))
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
      (s.apply !== undefined &&
        !(SUGGESTION_APPLIES as readonly unknown[]).includes(s.apply)) ||
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

/** A report output found in a notebook. */
export interface IFound {
  cellIndex: number;
  data: unknown;
  /**
   * What identifies this output while it lives (its output model): a cell run
   * again gets new outputs, so a new key. Defaults to `data`.
   */
  key?: object;
}

/** What the sidebar shows for a notebook: its latest report and the per-cell history. */
export interface INotebookState {
  latest: IReport | null;
  latestCellIndex: number | null;
  /** The latest report's arrival number (0 without one). */
  latestArrival: number;
  history: IHistoryPoint[];
  /** The history is what the notebook was saved with (nothing ran since the kernel started). */
  historySaved: boolean;
  errors: string[];
}

/** The state of a notebook with no reports. */
export const EMPTY_STATE: INotebookState = {
  latest: null,
  latestCellIndex: null,
  latestArrival: 0,
  history: [],
  historySaved: false,
  errors: []
};

/**
 * The reports of one notebook in the order they arrived, not by execution
 * count (a restarted kernel numbers cells from 1 again, below the saved ones).
 *
 * Outputs seen at the first read (a saved notebook) arrive in document order,
 * so the latest is the last saved report in the document; every output that
 * appears later (a cell run now, in `%%gpumem` or auto mode) arrives after
 * them. The history is the current kernel session's reports, one per cell.
 */
export class ReportLog {
  private arrivals = new WeakMap<object, number>();
  private count = 0;
  private sessionStart = 0;
  private firstRead = true;

  /** A new kernel session (a restart, another kernel): the history starts again. */
  newSession(): void {
    this.sessionStart = this.count;
    this.restarted = true;
  }

  /** A kernel session started since the notebook was opened: saved reports are no longer charted. */
  private restarted = false;

  /** The arrival number of each output, assigned on first sight. */
  private arrival(item: IFound): number {
    const key = (item.key ?? item.data) as object;
    let seen = this.arrivals.get(key);
    if (seen === undefined) {
      seen = ++this.count;
      this.arrivals.set(key, seen);
    }
    return seen;
  }

  /** Read the reports found now (in document order) into what the sidebar shows. */
  read(found: IFound[]): INotebookState {
    const state: INotebookState = { ...EMPTY_STATE, history: [], errors: [] };
    const session = new Map<number, [number, IReport]>();
    const saved = new Map<number, [number, IReport]>();
    for (const item of found) {
      const arrival = this.arrival(item);
      const parsed = parseReport(item.data);
      if (parsed.error !== undefined) {
        if (!state.errors.includes(parsed.error)) {
          state.errors.push(parsed.error);
        }
        continue;
      }
      const report = parsed.report as IReport;
      if (arrival > state.latestArrival) {
        state.latestArrival = arrival;
        state.latest = report;
        state.latestCellIndex = item.cellIndex;
      }
      const into = arrival > this.sessionStart ? session : saved;
      const known = into.get(item.cellIndex);
      if (!known || known[0] < arrival) {
        into.set(item.cellIndex, [arrival, report]);
      }
    }
    if (this.firstRead) {
      // What the notebook was opened with is saved, not this session's.
      this.firstRead = false;
      this.sessionStart = this.count;
      saved.clear();
      for (const [cellIndex, entry] of session) {
        saved.set(cellIndex, entry);
      }
      session.clear();
    }
    state.historySaved =
      !this.restarted && session.size === 0 && saved.size > 0;
    const points = state.historySaved ? saved : session;
    state.history = [...points.entries()]
      .sort((a, b) => a[0] - b[0])
      .map(([cellIndex, [, report]]) => ({
        cellIndex,
        executionCount: report.cell,
        peakBytes: report.peak_bytes,
        oom: report.oom !== null
      }));
    return state;
  }

  /** How many outputs have arrived (the sidebar redraws only when this or the layout changes). */
  get arrived(): number {
    return this.count;
  }
}

/** The state of a notebook read once, as a fresh sidebar would (saved outputs in document order). */
export function notebookState(found: IFound[]): INotebookState {
  return new ReportLog().read(found);
}

/**
 * Bytes exactly as Python's `oomnb.format_bytes` writes them: 4096 -> "4.00 KiB".
 * Two decimals, rounding an exact tie to even as Python's format does
 * (1.125 MiB is "1.12 MiB"), so both sides print the same figures.
 */
export function formatBytes(
  value: number | null | undefined,
  signed = false
): string {
  if (value === null || value === undefined) {
    return 'unknown';
  }
  const sign = value < 0 ? '-' : signed && value > 0 ? '+' : '';
  const rest = Math.abs(value);
  if (rest < 1024) {
    return `${sign}${Math.trunc(rest)} B`;
  }
  const units: [string, number][] = [
    ['KiB', 1024],
    ['MiB', 1024 ** 2],
    ['GiB', 1024 ** 3]
  ];
  for (const [unit, factor] of units) {
    if (rest < factor * 1024) {
      return `${sign}${twoDecimals(rest, factor)} ${unit}`;
    }
  }
  return `${sign}${twoDecimals(rest, 1024 ** 4)} TiB`;
}

/** `value / factor` with two decimals, ties to even (factor is a power of two). */
function twoDecimals(value: number, factor: number): string {
  const scaled = value * 100;
  if (!Number.isSafeInteger(scaled)) {
    return (value / factor).toFixed(2);
  }
  let hundredths = Math.floor(scaled / factor);
  const remainder = scaled - hundredths * factor;
  if (
    2 * remainder > factor ||
    (2 * remainder === factor && hundredths % 2 === 1)
  ) {
    hundredths += 1;
  }
  const whole = Math.floor(hundredths / 100);
  const cents = String(hundredths % 100).padStart(2, '0');
  return `${whole}.${cents}`;
}

/** "OutOfMemoryError allocating 128.00 MiB": the exception type and the failing request. */
export function failure(report: IReport): string {
  const oom = report.oom;
  if (!oom) {
    return '';
  }
  const type = oom.exception_type ?? 'OutOfMemoryError';
  if (oom.requested_bytes === null || oom.requested_bytes === undefined) {
    return type;
  }
  return `${type} allocating ${formatBytes(oom.requested_bytes)}`;
}

/**
 * The one line every rendering tells of an OOM, "needs X, has Y usable of Z, short
 * by W": the twin of Python's `oomnb.render.report.story` (a test holds them
 * to each other on the same fixture reports). Empty without an OOM.
 */
export function story(report: IReport): string {
  const oom = report.oom;
  if (!oom) {
    return '';
  }
  const needs = oom.needs_bytes ?? null;
  const has = oom.has_bytes ?? null;
  if (needs !== null && has !== null) {
    const atLeast = oom.needs_at_least ? 'at least ' : '';
    const capacity = report.device.capacity_bytes || oom.capacity_bytes;
    const of =
      capacity !== null && capacity !== undefined && capacity !== has
        ? ` usable of ${formatBytes(capacity)}`
        : '';
    const text = `needs ${atLeast}${formatBytes(needs)}, has ${formatBytes(has)}${of}`;
    const short = needs - has;
    if (short > 0) {
      return `${text}, short by ${atLeast}${formatBytes(short)}`;
    }
    return `${text}, ${formatBytes(-short)} to spare`;
  }
  if (oom.requested_bytes !== null && oom.free_bytes !== null) {
    const text = `needs ${formatBytes(oom.requested_bytes)} more, has ${formatBytes(oom.free_bytes)} free`;
    const short = oom.requested_bytes - oom.free_bytes;
    return short > 0 ? `${text}, short by ${formatBytes(short)}` : text;
  }
  return '';
}

/** One line for auto mode, as Python's `headline`: "oomnb [3] delta +4.00 KiB, peak ...". */
export function headline(report: IReport): string {
  const cell = report.cell !== null ? `[${report.cell}]` : '[-]';
  const where =
    report.device.kind === 'simulated' ? 'simulated' : report.device.name;
  let text =
    `oomnb ${cell} delta ${formatBytes(report.delta_bytes, true)}, ` +
    `peak ${formatBytes(report.peak_bytes)}, ${report.duration_s.toFixed(2)} s (${where})`;
  if (report.oom) {
    text += ' - OUT OF MEMORY';
  }
  return text;
}

/** What released names say: "recovered 160.00 MiB (rolled back: x); allocated now ...". */
export function recovered(report: IReport): string {
  let text = `recovered ${formatBytes(report.recovered_bytes)}`;
  if (report.released_names && report.released_names.length) {
    text += ` (rolled back: ${report.released_names.join(', ')})`;
  }
  return `${text}; allocated now ${formatBytes(report.end_bytes)}; the kernel is fine`;
}
