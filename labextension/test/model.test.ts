import * as fs from 'fs';
import * as path from 'path';

import {
  formatBytes,
  MIME_TYPE,
  notebookState,
  parseReport,
  SUGGESTION_APPLIES,
  SUGGESTION_KINDS
} from '../src/model';

function report(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    schema_version: 1,
    cell: 3,
    source: 'x = torch.randn(1024)',
    device: { kind: 'simulated', name: 'simulated T4', index: 0, capacity_bytes: 15837691904, card: 'T4' },
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
    ['suggestions', [{ kind: 'batch_size', title: 't', detail: 'd', code: '', saves_bytes: 1, source: 'guess' }]],
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
    const parsed = parseReport(report({ batch_var: { name: 'x', value: '<img src=x onerror=alert(1)>' } }));
    expect(parsed.report?.batch_var?.value).toBe('<img src=x onerror=alert(1)>');
  });
});

describe('notebookState', () => {
  it('is empty without reports', () => {
    const state = notebookState([]);
    expect(state.latest).toBeNull();
    expect(state.history).toEqual([]);
  });

  it('takes the highest execution count as the latest and keeps one point per cell', () => {
    const state = notebookState([
      { cellIndex: 5, data: report({ cell: 2, peak_bytes: 100 }) },
      { cellIndex: 1, data: report({ cell: 7, peak_bytes: 300 }) },
      { cellIndex: 3, data: report({ cell: 4, peak_bytes: 200, oom: { requested_bytes: 10, free_bytes: 1, capacity_bytes: 8, message: 'CUDA out of memory.' } }) },
      { cellIndex: 5, data: report({ cell: 9, peak_bytes: 150 }) }
    ]);
    expect(state.latest?.cell).toBe(9);
    expect(state.latestCellIndex).toBe(5);
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
  const schema = JSON.parse(
    fs.readFileSync(path.join(__dirname, '..', '..', 'oomnb', 'schema', 'report.schema.json'), 'utf8')
  );
  const item = schema.properties.suggestions.items.properties;

  it('has the kinds of the JSON Schema, no more, no fewer', () => {
    expect([...SUGGESTION_KINDS].sort()).toEqual([...item.kind.enum].sort());
  });

  it('has the ways to apply of the JSON Schema', () => {
    expect([...SUGGESTION_APPLIES].sort()).toEqual([...item.apply.enum].sort());
  });

  it('refuses a suggestion of an unknown kind, in one line', () => {
    const suggestion = { kind: 'buy_a_bigger_gpu', title: 't', detail: 'd', saves_bytes: null, params: {}, code: '', source: 'rule' };
    const parsed = parseReport(report({ suggestions: [suggestion] }));
    expect(parsed.error).toBe('oomnb report: malformed suggestion');
    const known = parseReport(report({ suggestions: [{ ...suggestion, kind: 'combination', apply: 'replace_cell' }] }));
    expect(known.error).toBeUndefined();
  });
});
