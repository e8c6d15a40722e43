"""Every example of README.rst, run against the demo cluster on the lab.

An example is a line `$ planb-pvesync ARGS` in a literal block of README.rst
(the indented text after a `::`). The examples run in the order they stand,
each as planb on the lab's backup host, as a shell there reads the line, on
a demo cluster whose disks have no snapshots yet: an example sees what the
ones before it did. Each must exit 0, print nothing on stderr, and print on
stdout what the lines under it say, up to the next `$` line or the end of
the block, where:

- a line `...` stands for any number of lines;
- sizes, durations and rates (`8.2 MiB`, `5.8 s`, `1.4 MiB/s`), the tool's
  snapshot names (`planb-20261126T013000Z`) and times (`2026-11-26
  01:30:04`) stand for any other of their kind;
- two or more spaces (between the columns of a table) stand for one or more.

So a README example is written by running it on the demo (`make demo`
leaves the lab's VMs stopped; `make lab` boots one, `PLANB_LAB_DIR=... pytest
tests/test_readme_lab.py` runs this against it) and pasting what it prints,
shortened with `...`. A command line meant to be adapted, not run as it
stands, goes without `$ `.
"""
import re
import shlex
import textwrap
from pathlib import Path

import pytest

from lab.cluster import DEMO_DATASETS

README = Path(__file__).resolve().parent.parent / 'README.rst'
ROOT = 'tank/enc'
CLONE_ORIGIN = '@__base__'          # of the demo's linked clone: part of the demo
# What may differ from run to run, each with the pattern of its kind.
VARYING = [
    (r'planb-\d{8}T\d{6}Z', r'planb-\d{8}T\d{6}Z'),
    (r'\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}', r'\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}'),
    (r'\d+(?:\.\d+)? (?:[KMGT]i)?B(?:/s)?\b', r'\d+(?:\.\d+)? (?:[KMGT]i)?B(?:/s)?'),
    (r'\d+(?:\.\d+)? (?:s|min|h|d)\b', r'\d+(?:\.\d+)? (?:s|min|h|d)'),
]
ANY_LINES = '...'
EXAMPLE_TIMEOUT = 900               # seconds; a busy machine slows the lab down


def literal_blocks(text):
    """The literal blocks of an rst text, dedented, in order."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        if not line.rstrip().endswith('::') or line.lstrip().startswith('..'):
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following)
        blocks.append(textwrap.dedent('\n'.join(block)).strip('\n'))
    return blocks


def readme_examples(text):
    """[(command line, [expected lines])] in the order they stand."""
    examples = []
    for block in literal_blocks(text):
        current = None
        for line in block.splitlines():
            if line.startswith('$ '):
                current = (line[2:], [])
                examples.append(current)
            elif current is not None:
                current[1].append(line)
    return [(command, strip_blank_tail(lines)) for command, lines in examples]


def strip_blank_tail(lines):
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def line_pattern(expected: str) -> str:
    """The regular expression of one expected line, what varies made general."""
    parts, rest = [], expected
    while rest:
        found = [(m.start(), m.end(), pattern) for kind, pattern in VARYING
                 for m in [re.search(kind, rest)] if m]
        if not found:
            parts.append(re.escape(rest))
            break
        start, end, pattern = min(found)
        parts += [re.escape(rest[:start]), pattern]
        rest = rest[end:]
    text = ''.join(parts)
    return re.sub(r'(\\ ){2,}', ' +', text)


def matches(expected_lines, actual_lines) -> bool:
    """Whether the actual output is what the README's lines say."""
    pattern = ''
    for line in expected_lines:
        pattern += r'(?:[^\n]*\n)*?' if line.strip() == ANY_LINES else line_pattern(line) + r'\n'
    return re.fullmatch(pattern, ''.join(line + '\n' for line in actual_lines)) is not None


def source_datasets():
    return [(node, dataset) for node, datasets in DEMO_DATASETS.items()
            for dataset, _ in datasets] + [('pve1', 'rpool/data/vm-101-disk-0')]


def clear_history(lab, new_backups):
    """The demo cluster as it was made: no snapshot or bookmark on its disks
    but the linked clone's origin, and none of `new_backups` here (once no
    run of the tool holds them)."""
    lab.backup.run("timeout 600 sh -c 'while pgrep -u planb -f planb_pvesync >/dev/null; "
                   "do sleep 1; done'", check=False)
    for name in new_backups:
        lab.backup.zfs('destroy -r ' + shlex.quote(name))
    for node in ('pve1', 'pve2'):
        datasets = ' '.join(shlex.quote(d) for n, d in source_datasets() if n == node)
        lab[node].run('zfs list -H -o name -t snapshot,bookmark {} | grep -v -F {} '
                      '| xargs -r -n1 zfs destroy'.format(datasets, CLONE_ORIGIN))


def backups(lab):
    return set(lab.backup.zfs('list -H -o name -d 1 ' + ROOT).splitlines()[1:])


@pytest.fixture
def fresh_demo(demo):
    """The demo cluster without the snapshots that other tests left on its
    disks; what the examples add is removed again afterwards."""
    before = backups(demo)
    clear_history(demo, [])
    yield demo
    clear_history(demo, sorted(backups(demo) - before))


def test_the_readme_parser_finds_the_examples():
    text = README.read_text()
    examples = readme_examples(text)
    assert len(examples) == len(re.findall(r'^ +\$ planb-pvesync ', text, re.M)) > 0
    assert all(command.startswith('planb-pvesync ') for command, _ in examples)


@pytest.mark.parametrize('expected, actual, same', [
    (['a', '...', 'z'], ['a', 'b', 'c', 'z'], True),
    (['a', '...'], ['a'], True),
    (['x: 8.2 MiB in 5.8 s (1.4 MiB/s)'], ['x: 12 KiB in 15.0 s (800 B/s)'], True),
    (['@planb-20261126T013000Z  2026-11-26 01:30:04'],
     ['@planb-20261202T120000Z    2026-12-02 12:00:00'], True),
    (['3 synced'], ['2 synced'], False),
    (['a'], ['a', 'b'], False),
])
def test_what_may_differ(expected, actual, same):
    assert matches(expected, actual) is same


def test_every_readme_example_on_the_demo_cluster(fresh_demo):
    failed = []
    for command, expected in readme_examples(README.read_text()):
        done = fresh_demo.backup.run(command, user='planb', check=False, timeout=EXAMPLE_TIMEOUT)
        actual = done.stdout.splitlines()
        if done.returncode != 0 or done.stderr or not matches(expected, actual):
            failed.append('$ {}\nexit {}; README says:\n{}\nit printed:\n{}{}'.format(
                command, done.returncode, '\n'.join(expected), done.stdout, done.stderr))
    assert not failed, '\n\n'.join(failed)
