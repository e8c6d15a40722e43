#!/usr/bin/env python3
"""Draw bench/scale.png from bench/results.json (written by bench/bench.py).

    python3 bench/plot.py [RESULTS_JSON] [-o PNG]

Two panels side by side: wall time and remote commands per run against the
number of zvols, one colour per tool, a solid line for case 1 (nothing to do)
and a dashed one for case 2 (a little new data), a marker at each measured size.
Needs matplotlib (bench/requirements.txt).
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOL_COLOURS = {'planb-pvesync': 'tab:blue', 'syncoid': 'tab:orange', 'zfs-autobackup': 'tab:green'}
CASE_STYLES = {1: ('-', 'o', 'nothing to do'), 2: ('--', 's', 'a little new data')}


def series(results, tool, case):
    """[(zvols, median wall s, commands of the last run), ...] by size."""
    return sorted((r['zvols'], r['wall'], r['commands'][-1]) for r in results
                  if r['tool'] == tool and r['case'] == case and r['zvols'])


def draw(data, out: Path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (wall_ax, commands_ax) = plt.subplots(1, 2, figsize=(8, 3.8), dpi=100)
    for case, (line, marker, _) in CASE_STYLES.items():
        for tool, colour in TOOL_COLOURS.items():
            points = series(data['results'], tool, case)
            if points:
                zvols, walls, commands = zip(*points)
                wall_ax.plot(zvols, walls, line, marker=marker, color=colour)
                commands_ax.plot(zvols, commands, line, marker=marker, color=colour)
    for ax, title, label in ((wall_ax, 'Wall time per run', 'seconds (median)'),
                             (commands_ax, 'Remote commands per run', 'commands on the nodes')):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel('zvols (over 2 nodes)')
        ax.set_ylabel(label)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    handles = ([Line2D([], [], color=colour, lw=2.5, label=tool) for tool, colour in TOOL_COLOURS.items()]
               + [Line2D([], [], color='black', ls=line, marker=marker, label='case {}: {}'.format(case, name))
                  for case, (line, marker, name) in CASE_STYLES.items()])
    fig.legend(handles=handles, loc='lower center', ncol=5, frameon=False, fontsize=8.5,
               handlelength=2.5, columnspacing=1.2)
    fig.suptitle('planb-pvesync, syncoid, zfs-autobackup on the lab ({})'.format(data['date']),
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('results', nargs='?', type=Path, default=HERE / 'results.json')
    p.add_argument('-o', '--out', type=Path, default=HERE / 'scale.png')
    args = p.parse_args(argv)
    data = json.loads(args.results.read_text())
    if not any(r['zvols'] for r in data['results']):
        print('plot: no results of cases 1, 2 in {}'.format(args.results), file=sys.stderr)
        return 1
    draw(data, args.out)
    print('plot: {}'.format(args.out), file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
