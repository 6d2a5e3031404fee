import * as fs from 'fs';
import * as path from 'path';

import Ajv2020 from 'ajv/dist/2020';

import {
  formatBytes,
  headline,
  IReport,
  MIME_TYPE,
  notebookState,
  parseReport,
  ReportLog,
  story,
  SUGGESTION_APPLIES,
  SUGGESTION_KINDS
} from '../src/model';

const ROOT = path.join(__dirname, '..', '..');
const SCHEMA = JSON.parse(
  fs.readFileSync(
    path.join(ROOT, 'oomnb', 'schema', 'report.schema.json'),
    'utf8'
  )
);
/** Real reports written by Python (tests/report_fixtures.py), with the story Python tells of each. */
const FIXTURES = JSON.parse(
  fs.readFileSync(path.join(ROOT, 'tests', 'fixtures', 'reports.json'), 'utf8')
) as {
  reports: {
    name: string;
    report: Record<string, unknown>;
    story: string;
    headline: string;
  }[];
  format_bytes: [number, string][];
};

function report(
  overrides: Record<string, unknown> = {}
): Record<string, unknown> {
  return {
    schema_version: 1,
    cell: 3,
    source: 'x = torch.randn(1024)',
    device: {
      kind: 'simulated',
      name: 'simulated T4',
      index: 0,
      capacity_bytes: 15837691904,
      card: 'T4'
    },
    baseline_bytes: 0,
    end_bytes: 4096,
    delta_bytes: 4096,
    peak_bytes: 4096,
    reserved_bytes: 4096,
    free_bytes: 15837687808,
    duration_s: 0.01,
    batch_var: null,
    oom: null,
    recovered_bytes: 0,
    released_names: [],
    suggestions: [],
    dry_run: false,
    ...overrides
  };
}

describe('parseReport', () => {
  it('accepts a schema_version 1 report', () => {
    const parsed = parseReport(report());
    expect(parsed.error).toBeUndefined();
    expect(parsed.report?.peak_bytes).toBe(4096);
  });

  it('refuses an unknown schema_version with one line', () => {
    const parsed = parseReport(report({ schema_version: 2 }));
    expect(parsed.report).toBeUndefined();
    expect(parsed.error).toBe(
      'oomnb report with schema_version 2: this sidebar reads version 1; update the extension'
    );
    expect(parsed.error).not.toContain('\n');
  });

  it.each([
    ['peak_bytes', 'many'],
    ['device', { kind: 'tpu', name: 'x', index: 0, capacity_bytes: null }],
    ['oom', { requested_bytes: 'lots' }],
    [
      'suggestions',
      [
        {
          kind: 'batch_size',
          title: 't',
          detail: 'd',
          code: '',
          saves_bytes: 1,
          source: 'guess'
        }
      ]
    ],
    ['suggestions', 'none']
  ])('refuses a malformed %s', (key, value) => {
    const parsed = parseReport(report({ [key]: value }));
    expect(parsed.report).toBeUndefined();
    expect(parsed.error).toMatch(/^oomnb report: /);
  });

  it('refuses what is not an object', () => {
    expect(parseReport('text').error).toBe('oomnb report: not a JSON object');
    expect(parseReport(null).error).toBe('oomnb report: not a JSON object');
  });

  it('keeps markup in strings as data', () => {
    const parsed = parseReport(
      report({
        batch_var: { name: 'x', value: '<img src=x onerror=alert(1)>' }
      })
    );
    expect(parsed.report?.batch_var?.value).toBe(
      '<img src=x onerror=alert(1)>'
    );
  });
});

describe('notebookState', () => {
  it('is empty without reports', () => {
    const state = notebookState([]);
    expect(state.latest).toBeNull();
    expect(state.history).toEqual([]);
  });

  it('takes the last saved report in document order as the latest, whatever its execution count', () => {
    const state = notebookState([
      { cellIndex: 1, data: report({ cell: 7, peak_bytes: 300 }) },
      {
        cellIndex: 3,
        data: report({
          cell: 4,
          peak_bytes: 200,
          oom: {
            requested_bytes: 10,
            free_bytes: 1,
            capacity_bytes: 8,
            message: 'CUDA out of memory.'
          }
        })
      },
      { cellIndex: 5, data: report({ cell: 2, peak_bytes: 150 }) }
    ]);
    expect(state.latest?.cell).toBe(2);
    expect(state.latestCellIndex).toBe(5);
    expect(state.historySaved).toBe(true);
    expect(state.history.map(p => [p.cellIndex, p.peakBytes, p.oom])).toEqual([
      [1, 300, false],
      [3, 200, true],
      [5, 150, false]
    ]);
  });

  it('reports each distinct error once and keeps the good reports', () => {
    const state = notebookState([
      { cellIndex: 0, data: report({ schema_version: 3 }) },
      { cellIndex: 1, data: report({ schema_version: 3 }) },
      { cellIndex: 2, data: report({ cell: 1 }) }
    ]);
    expect(state.errors).toHaveLength(1);
    expect(state.latest?.cell).toBe(1);
  });
});

describe('ReportLog', () => {
  // Outputs as the notebook holds them: one object per output, kept while it lives.
  const output = (cellIndex: number, cell: number, peak = 100) => ({
    cellIndex,
    data: report({ cell, peak_bytes: peak }),
    key: {}
  });

  it('follows arrival, not execution numbers: a cell run now beats saved reports numbered higher', () => {
    const log = new ReportLog();
    const saved = [output(0, 5), output(2, 6), output(4, 12)];
    expect(log.read(saved).latest?.cell).toBe(12);
    // The kernel restarted; cell 2 runs again as [3] and replaces its output.
    log.newSession();
    const rerun = output(2, 3, 999);
    const state = log.read([saved[0], rerun, saved[2]]);
    expect(state.latest?.cell).toBe(3);
    expect(state.latestCellIndex).toBe(2);
    // The chart shows this session's cells only.
    expect(state.historySaved).toBe(false);
    expect(
      state.history.map(p => [p.cellIndex, p.executionCount, p.peakBytes])
    ).toEqual([[2, 3, 999]]);
    // Another restart: nothing of the new session yet, so nothing charted; the latest stays.
    log.newSession();
    const quiet = log.read([saved[0], rerun, saved[2]]);
    expect(quiet.history).toEqual([]);
    expect(quiet.historySaved).toBe(false);
    expect(quiet.latest?.cell).toBe(3);
  });

  it('keeps the latest when nothing new arrives, and takes a later run of an earlier cell', () => {
    const log = new ReportLog();
    const first = output(3, 1);
    const second = output(1, 2);
    log.read([]);
    log.read([first]);
    expect(log.read([second, first]).latest?.cell).toBe(2);
    expect(log.read([second, first]).latestArrival).toBe(2);
    const again = output(3, 4);
    const state = log.read([second, again]);
    expect(state.latest?.cell).toBe(4);
    expect(state.history.map(p => p.cellIndex)).toEqual([1, 3]);
  });

  it('moves a report with its cell when cells are moved', () => {
    const log = new ReportLog();
    const a = output(0, 1);
    log.read([a]);
    const state = log.read([{ ...a, cellIndex: 4 }]);
    expect(state.latestCellIndex).toBe(4);
    expect(state.latestArrival).toBe(1);
  });
});

describe('the fixture reports Python wrote', () => {
  const validate = new Ajv2020({ strict: false }).compile(SCHEMA);

  it.each(FIXTURES.reports.map(item => [item.name, item] as const))(
    '%s is valid for the schema and the parser, and tells the story Python tells',
    (_, item) => {
      expect(validate(item.report)).toBe(true);
      const parsed = parseReport(item.report);
      expect(parsed.error).toBeUndefined();
      const parsedReport = parsed.report as IReport;
      expect(story(parsedReport)).toBe(item.story);
      expect(headline(parsedReport)).toBe(item.headline);
    }
  );

  it.each([
    ['peak_bytes', 'many'],
    ['schema_version', 2],
    ['device', { kind: 'tpu', name: 'x', index: 0, capacity_bytes: null }],
    ['suggestions', 'none']
  ])('refuses a report the schema refuses (%s)', (key, value) => {
    const broken = { ...FIXTURES.reports[1].report, [key]: value };
    expect(validate(broken)).toBe(false);
    expect(parseReport(broken).error).toMatch(/^oomnb report/);
  });

  it('formats bytes as Python does, ties to even included', () => {
    for (const [value, text] of FIXTURES.format_bytes) {
      expect(formatBytes(value)).toBe(text);
    }
  });
});

describe('formatBytes', () => {
  it('matches the Python side', () => {
    expect(formatBytes(4096)).toBe('4.00 KiB');
    expect(formatBytes(64 * 1024 ** 2)).toBe('64.00 MiB');
    expect(formatBytes(-3 * 1024 ** 2)).toBe('-3.00 MiB');
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(null)).toBe('unknown');
    expect(MIME_TYPE).toBe('application/vnd.oomnb.report+json');
  });
});

describe('suggestion vocabulary', () => {
  const item = SCHEMA.properties.suggestions.items.properties;

  it('has the kinds of the JSON Schema, no more, no fewer', () => {
    expect([...SUGGESTION_KINDS].sort()).toEqual([...item.kind.enum].sort());
  });

  it('has the ways to apply of the JSON Schema', () => {
    expect([...SUGGESTION_APPLIES].sort()).toEqual([...item.apply.enum].sort());
  });

  it('refuses a suggestion of an unknown kind, in one line', () => {
    const suggestion = {
      kind: 'buy_a_bigger_gpu',
      title: 't',
      detail: 'd',
      saves_bytes: null,
      params: {},
      code: '',
      source: 'rule'
    };
    const parsed = parseReport(report({ suggestions: [suggestion] }));
    expect(parsed.error).toBe('oomnb report: malformed suggestion');
    const known = parseReport(
      report({
        suggestions: [
          { ...suggestion, kind: 'combination', apply: 'replace_cell' }
        ]
      })
    );
    expect(known.error).toBeUndefined();
  });
});
