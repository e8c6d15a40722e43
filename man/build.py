#!/usr/bin/env python3
"""Build the man page planb-pvesync(8) with docutils' man page writer.

    python3 man/build.py planb-pvesync.8

The source is man/planb-pvesync.8.rst. Its commands and options come from the
tool's own argument parser, and most of its text from the parts of README.rst
marked `.. man NAME` (up to `.. man end`), so that nothing is written twice.
Any docutils warning is an error.
"""
import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / 'planb-pvesync.8.rst'
sys.path.insert(0, str(HERE.parent))    # the tool of this checkout

import planb_pvesync  # noqa: E402


def header() -> str:
    """Title, the one-line summary and the man page's fields."""
    summary = planb_pvesync.__doc__.split('\n', 1)[0].split(': ', 1)[1].rstrip('.')
    rule = '-' * len(summary)
    return '\n'.join(['=' * 13, 'planb-pvesync', '=' * 13, '', rule, summary, rule, '',
                      ':Manual section: 8', ':Manual group: System Administration',
                      ':Version: ' + planb_pvesync.__version__, '', ''])


def literal(text: str) -> str:
    return '``{}``'.format(text)


def synopsis(parser) -> str:
    lines = ['| ' + literal('planb-pvesync [OPTIONS] COMMAND [OPTIONS]')]
    for name, command in planb_pvesync.COMMANDS.items():
        lines.append('| ' + literal(' '.join(filter(None, ['planb-pvesync', name, command.synopsis,
                                                           '[OPTIONS]']))))
    return '\n'.join(lines) + '\n'


def invocation(action) -> str:
    """How the option is written: '-f FILENAME, --config FILENAME'."""
    if not action.option_strings:
        return literal(action.metavar)
    if action.nargs == 0:
        return ', '.join(map(literal, action.option_strings))
    value = action.metavar or ('{' + ','.join(action.choices) + '}' if action.choices
                               else action.dest.upper())
    return ', '.join(literal('{} {}'.format(name, value)) for name in action.option_strings)


def description(action) -> str:
    """The help text with its %(default)s and the like filled in, as argparse does."""
    params = {key: value for key, value in vars(action).items() if value is not argparse.SUPPRESS}
    if params.get('choices') is not None:
        params['choices'] = ', '.join(map(str, params['choices']))
    return action.help % params


def option_list(actions) -> str:
    items = ['{}\n    {}\n'.format(invocation(a), description(a).replace('*', r'\*'))
             for a in actions if a.dest != 'help']
    return '\n'.join(items)


def options(parser) -> str:
    """The options that may stand before the command, then each command's
    own, naming which of the former it takes."""
    common = [a for a in parser.added if a.dest not in ('help', 'version')]
    parts = ['Before the command\n' + '-' * 18 + '\n',
             'These may stand before the command, as in the origin, or after it, for a '
             'command that takes them.\n', option_list(common)]
    for name, sub in parser.commands.items():
        shared = [a.option_strings[0] for a in sub.added if a.dest in {c.dest for c in common}]
        own = [a for a in sub.added if a.dest not in {c.dest for c in common}]
        parts += [name + '\n' + '-' * len(name) + '\n',
                  'Also {} (see *Before the command*).\n'.format(
                      ', '.join(map(literal, dict.fromkeys(shared)))),
                  option_list(own)]
    return '\n'.join(parts)


def readme_part(name: str) -> str:
    """An include of the part of README.rst marked `.. man NAME`."""
    return ('.. include:: ../README.rst\n   :start-after: .. man {}\n'
            '   :end-before: .. man end\n'.format(name))


def source_text() -> str:
    os.environ['COLUMNS'] = '80'            # argparse's line width, for the same page anywhere
    parser = planb_pvesync.build_parser()
    text = SOURCE.read_text(encoding='utf-8')
    for marker, generated in (('synopsis', synopsis(parser)), ('options', options(parser))):
        text = text.replace('.. generated: {}\n'.format(marker), generated)
    lines = [readme_part(line.split()[-1]) if line.startswith('.. readme: ') else line
             for line in text.splitlines(keepends=True)]
    return header() + ''.join(lines)


def build(out: Path):
    from docutils.core import publish_string
    page = publish_string(source_text(), source_path=str(SOURCE), writer_name='manpage',
                          settings_overrides={'halt_level': 2, 'report_level': 2,
                                              'input_encoding': 'utf-8',
                                              'output_encoding': 'utf-8'})
    out.write_bytes(page)


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit('usage: python3 man/build.py OUT (e.g. /usr/local/share/man/man8/planb-pvesync.8)')
    build(Path(sys.argv[1]))
