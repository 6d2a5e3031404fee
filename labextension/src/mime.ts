/**
 * Renders application/vnd.oomnb.report+json inline in notebooks. Frontends
 * without this extension (VS Code, nbconvert) show the report's HTML instead.
 */
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

import { MIME_TYPE, parseReport } from './model';
import { el, renderReport, renderSuggestions } from './view';

/** A widget that renders one report. */
export class ReportRenderer extends Widget implements IRenderMime.IRenderer {
  constructor() {
    super();
    this.addClass('oomnb-inline');
  }

  /** Render the report's JSON (validated; a bad report is one line of notice). */
  renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    this.node.textContent = '';
    const parsed = parseReport(model.data[MIME_TYPE]);
    if (parsed.error !== undefined) {
      this.node.appendChild(el('div', 'oomnb-notice', parsed.error));
    } else if (parsed.report) {
      this.node.appendChild(renderReport(parsed.report));
      if (parsed.report.suggestions.length) {
        this.node.appendChild(renderSuggestions(parsed.report.suggestions));
      }
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
