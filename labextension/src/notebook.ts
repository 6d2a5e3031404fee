/**
 * Finding reports in a notebook's outputs, and what the notebook has run.
 */
import { NotebookPanel } from '@jupyterlab/notebook';

import { IFound, MIME_TYPE } from './model';

/** Reports found in a notebook's outputs, in document order, keyed by their output models. */
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
      const output = outputs.get(j);
      const data = output.data;
      if (data && MIME_TYPE in data) {
        found.push({ cellIndex: i, data: data[MIME_TYPE], key: output });
      }
    }
  }
  return found;
}

/** Whether a cell's source loads oomnb (`%load_ext oomnb`, or `import oomnb`). */
export function loadsOomnb(source: string): boolean {
  return /^\s*(%load_ext\s+oomnb\b|import\s+oomnb\b|from\s+oomnb\b)/m.test(
    source
  );
}
