/**
 * The sidebar's chart: the peak of every measured cell of the session, as an SVG.
 */
import { formatBytes, IHistoryPoint } from './model';

const SVG = 'http://www.w3.org/2000/svg';

/** A line of dots, one per cell; a click on a dot calls `onClick` with its cell index. */
export function peakChart(
  history: IHistoryPoint[],
  onClick: (cellIndex: number) => void
): SVGSVGElement {
  const width = 260;
  const height = 90;
  const pad = 6;
  const max = Math.max(...history.map(p => p.peakBytes), 1);
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('class', 'oomnb-chart');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  const step =
    history.length > 1 ? (width - 2 * pad) / (history.length - 1) : 0;
  const points = history.map((p, i) => [
    pad + i * step,
    height - pad - ((height - 2 * pad) * p.peakBytes) / max
  ]);
  const line = document.createElementNS(SVG, 'polyline');
  line.setAttribute('points', points.map(([x, y]) => `${x},${y}`).join(' '));
  line.setAttribute('class', 'oomnb-chart-line');
  svg.appendChild(line);
  history.forEach((p, i) => {
    const dot = document.createElementNS(SVG, 'circle');
    dot.setAttribute('cx', String(points[i][0]));
    dot.setAttribute('cy', String(points[i][1]));
    dot.setAttribute('r', '4');
    dot.setAttribute('class', p.oom ? 'oomnb-dot oomnb-dot-oom' : 'oomnb-dot');
    const tip = document.createElementNS(SVG, 'title');
    tip.textContent = `cell [${p.executionCount ?? '-'}]: peak ${formatBytes(p.peakBytes)}${
      p.oom ? ' (out of memory)' : ''
    }`;
    dot.appendChild(tip);
    dot.addEventListener('click', () => onClick(p.cellIndex));
    svg.appendChild(dot);
  });
  return svg;
}
