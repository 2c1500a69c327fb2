/** The FLIP Lab icon: a hub joined to three sites. */
import { LabIcon } from '@jupyterlab/ui-components';

const svgstr = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <circle cx="12" cy="12" r="3.2"/>
    <circle cx="4.5" cy="5" r="2.4"/>
    <circle cx="19.5" cy="5" r="2.4"/>
    <circle cx="12" cy="20.5" r="2.4"/>
    <path d="M6.2 6.6l4 3.6-1 1.1-4-3.6zM17.8 6.6l1 1.1-4 3.6-1-1.1zM11.25 14.5h1.5v4h-1.5z"/>
  </g>
</svg>`;

export const flipIcon = new LabIcon({ name: 'flip-lab:icon', svgstr });
