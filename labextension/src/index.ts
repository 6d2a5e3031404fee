/**
 * oomnb's JupyterLab extension: the "GPU memory" sidebar (see `plugin.ts`).
 * The inline report renderer is the MIME extension in `mime.ts`.
 */
import plugin from './plugin';

export { CommandIDs } from './plugin';
export { findReports } from './notebook';
export { gpuIcon, MemorySidebar } from './sidebar';

export default plugin;
