/**
 * Renders application/vnd.oomnb.report+json inline in notebooks. Frontends
 * without this extension (VS Code, nbconvert) show the report's HTML instead.
 */
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

import { IReport, MIME_TYPE, parseReport } from './model';
import { el, renderCompact, renderReport, renderSuggestions } from './view';

/** A widget that renders one report. */
export class ReportRenderer extends Widget implements IRenderMime.IRenderer {
  constructor() {
    super();
    this.addClass('oomnb-inline');
  }

  /**
   * Render the report's JSON (validated; a bad report is one line of notice).
   * Auto mode marks its reports compact in the output's metadata: one line
   * that opens to the whole report.
   */
  renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    this.node.textContent = '';
    const parsed = parseReport(model.data[MIME_TYPE]);
    if (parsed.error !== undefined) {
      this.node.appendChild(el('div', 'oomnb-notice', parsed.error));
      return Promise.resolve();
    }
    const report = parsed.report as IReport;
    const full = (): HTMLElement => {
      const box = el('div');
      box.appendChild(renderReport(report));
      if (report.suggestions.length) {
        box.appendChild(renderSuggestions(report.suggestions));
      }
      return box;
    };
    const meta = model.metadata[MIME_TYPE] as { compact?: boolean } | undefined;
    if (meta && meta.compact) {
      this.addClass('oomnb-inline-compact');
      this.node.appendChild(renderCompact(report, full));
    } else {
      this.removeClass('oomnb-inline-compact');
      this.node.appendChild(full());
    }
    return Promise.resolve();
  }
}

/** The renderer factory for the report MIME type. */
export const rendererFactory: IRenderMime.IRendererFactory = {
  safe: true,
  mimeTypes: [MIME_TYPE],
  defaultRank: 0,
  createRenderer: () => new ReportRenderer()
};

const extension: IRenderMime.IExtension = {
  id: 'oomnb:report-renderer',
  rendererFactory,
  rank: 0,
  dataType: 'json',
  documentWidgetFactoryOptions: []
};

export default extension;
