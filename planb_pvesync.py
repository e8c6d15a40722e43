#!/usr/bin/env python3
"""planb-pvesync: back up the ZFS disks of Proxmox VE guests to a ZFS backup host.

It asks the cluster's API which guests exist and where their disks live, then
pulls each disk with `ssh NODE 'sudo zfs send ... | compress' | decompress |
sudo zfs recv DEST`, incrementally, from snapshot to snapshot.

Read top to bottom: errors, config, PVE discovery, the host runner, the ZFS
listing and the sync planner, the pipeline, the sync engine, status, PlanB
(the engine as a PlanB fileset's transport), the CLI.
"""

import argparse
import calendar
import configparser
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import grp
import gzip
import hashlib
import ipaddress
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Dict, Iterable, List, Optional, Sequence, Set, Tuple


__version__ = '0.3.0'

log = logging.getLogger('planb_pvesync')

DEFAULT_CONFIG = '~/.proxmoxrc'
DEFAULT_API_PORT = 8006
DEFAULT_API_TIMEOUT = 10
# Preferred first where the server offers it: AES-GCM costs far less CPU than
# ssh's default chacha20-poly1305 on any CPU with AES instructions.
DEFAULT_SSH_CIPHERS = ('aes128-gcm@openssh.com,aes256-gcm@openssh.com,'
                       'chacha20-poly1305@openssh.com')
CONFIG_WORKERS = 16
# The tool's own snapshots kept on the source: the newest, and one to fall
# back on if the newest is lost on either side.
DEFAULT_KEEP_SOURCE = 2


# ==============================================================================
# Errors and exit codes
# ==============================================================================

EXIT_OK = 0
EXIT_FAILED = 1         # some volumes failed; the others were still attempted
EXIT_USAGE = 2          # usage or config error, as argparse
EXIT_CANNOT_START = 3   # could not start (API or ssh down); nothing changed
EXIT_STOPPED = 128      # plus the signal: 130 SIGINT (Ctrl-C), 143 SIGTERM, 129 SIGHUP


class PvesyncError(Exception):
    """Root of the tool's own errors; the message is one line for the user."""
    exit_code = EXIT_FAILED


class ConfigError(PvesyncError):
    exit_code = EXIT_USAGE


class UsageError(PvesyncError):
    exit_code = EXIT_USAGE


class PveError(PvesyncError):
    """The PVE API could not tell us what we need; nothing was changed."""
    exit_code = EXIT_CANNOT_START

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status            # the HTTP status, where there was one


class CommandError(PvesyncError):
    """One or more stages of a command pipeline failed. `failed` lists them in
    the order they ended: the first is the cause, the others (a decompressor
    cut off, zfs recv left with half a stream) mostly its effects."""

    def __init__(self, failed, stdout=''):
        self.failed = failed            # [(stage name, exit status, stderr)]
        self.stdout = stdout
        name, code, err = failed[0]
        message = '{} failed ({}): {}'.format(name, exit_text(code),
                                               own_words(err) or 'no error output')
        if len(failed) > 1:
            message += '; then ' + ', '.join('{} failed ({})'.format(n, exit_text(c))
                                             for n, c, _ in failed[1:])
        super().__init__(message)

    @property
    def stderr(self) -> str:
        return '\n'.join(err for _, _, err in self.failed)


def exit_text(code: int) -> str:
    """'exit 3', or 'killed by SIGTERM' for a process a signal ended."""
    if code < 0:
        try:
            return 'killed by ' + signal.Signals(-code).name
        except ValueError:
            return 'killed by signal {}'.format(-code)
    return 'exit {}'.format(code)


# zfs recv -s ends its error with how to resume by hand; the next run resumes
# by itself, and the cause is in the lines before.
RESUME_HINT = re.compile(r'^(Partially received snapshot is saved|A resuming stream can be '
                         r'generated)', re.M)
# zfs recv warns of each -x it was given for a property that a dataset of
# this type lacks (mountpoint for a volume): the tool passes those on purpose.
TYPE_WARNING = re.compile(r"^Warning: .*: property '[^']*' does not apply to datasets of "
                          r"this type$")


def own_words(stderr: str, lines=3) -> str:
    """What a failed program said, on one line: its last few lines (zfs breaks
    one message over two), without zfs recv's hint on resuming by hand or
    its warnings of properties excluded on purpose."""
    match = RESUME_HINT.search(stderr)
    text = stderr[:match.start()] if match else stderr
    said = [line for line in text.splitlines() if line.strip() and not TYPE_WARNING.match(line)]
    return ' '.join(' '.join(said[-lines:]).split())


# ==============================================================================
# Config (~/.proxmoxrc)
# ==============================================================================

@dataclasses.dataclass(frozen=True)
class SshSettings:
    """How to reach a host with ssh; the same keys serve clusters and storages."""
    user: Optional[str] = None
    port: Optional[int] = None
    key: Optional[str] = None
    ciphers: Optional[str] = None       # None: DEFAULT_SSH_CIPHERS
    options: Tuple[str, ...] = ()

    def argv(self, host: str) -> List[str]:
        """The ssh words a user would type to reach `host` this way."""
        words = ['ssh']
        if self.port:
            words += ['-p', str(self.port)]
        if self.key:
            words += ['-i', self.key]
        if self.ciphers:
            words += ['-c', self.ciphers]
        words += self.options
        words.append('{}@{}'.format(self.user, host) if self.user else host)
        return words

    def merged(self, override: 'SshSettings') -> 'SshSettings':
        """This, with every value that `override` sets taking precedence."""
        default = SshSettings()
        changes = {f.name: getattr(override, f.name)
                   for f in dataclasses.fields(self)
                   if getattr(override, f.name) != getattr(default, f.name)}
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    name: str
    host: str
    port: int = DEFAULT_API_PORT
    user: Optional[str] = None
    password: Optional[str] = None
    token_id: Optional[str] = None      # the part after '!' in USER@REALM!ID
    token_secret: Optional[str] = None
    verify_ssl: bool = True
    ca_file: Optional[str] = None
    fingerprints: Tuple[str, ...] = ()  # SHA-256, 'AB:CD:...' as PVE shows it; one per node
    failover: Tuple[Tuple[str, int], ...] = ()     # other nodes' (host, port) to try
    timeout: int = DEFAULT_API_TIMEOUT
    ssh: SshSettings = SshSettings()
    keep_source: Optional[int] = DEFAULT_KEEP_SOURCE    # None: keep them all
    keep_destination: Tuple = ()        # KeepRules; (): keep them all


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    cluster: str
    storage: str
    node: Optional[str]                 # None: the storage on every node
    target: str                         # user@host for ssh
    ssh: SshSettings = SshSettings()


@dataclasses.dataclass(frozen=True)
class Config:
    filename: str
    clusters: Dict[str, ClusterConfig]
    storages: Dict[Tuple[str, str, Optional[str]], StorageConfig]

    def cluster(self, name: Optional[str]) -> ClusterConfig:
        if name is None:
            if len(self.clusters) == 1:
                return next(iter(self.clusters.values()))
            raise UsageError('{}: {} [pve:...] sections; choose one with -p: {}'.format(
                self.filename, len(self.clusters) or 'no',
                ', '.join(sorted(self.clusters)) or '(none)'))
        try:
            return self.clusters[name]
        except KeyError:
            raise UsageError('{}: no [pve:{}] section; known clusters: {}'.format(
                self.filename, name, ', '.join(sorted(self.clusters)) or '(none)'))

    def storage(self, cluster: str, storage: str, node: str) -> Optional[StorageConfig]:
        """The section for this storage on this node, else the node-less one."""
        return (self.storages.get((cluster, storage, node))
                or self.storages.get((cluster, storage, None)))


SSH_KEYS = ('ssh_port', 'ssh_key', 'ssh_cipher', 'ssh_options')
CLUSTER_KEYS = ('api', 'failover', 'user', 'password', 'token', 'verify_ssl', 'ca_file',
                'fingerprint', 'timeout', 'ssh_user') + SSH_KEYS + (
                    'keep_source', 'keep_destination')
STORAGE_KEYS = ('ssh',) + SSH_KEYS
SECRET_KEYS = ('password', 'token')
FINGERPRINT_RE = re.compile(r'^([0-9A-F]{2}:){31}[0-9A-F]{2}$')


def parse_config(text: str, filename: str = DEFAULT_CONFIG) -> Config:
    """Parse the text of ~/.proxmoxrc; raise ConfigError naming what is wrong."""
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, default_section='\0no-defaults')
    # The origin README indents [storage:...] under [pve:...]; configparser
    # would read such lines as continuations, so section and key lines are
    # read flush left (values never span lines here).
    flush_left = '\n'.join(line.lstrip() for line in text.splitlines())
    try:
        parser.read_string(flush_left, source=filename)
    except configparser.Error as exc:
        raise ConfigError('{}: {}'.format(filename, _config_syntax_problem(
            exc, flush_left.splitlines())))
    clusters, storages = {}, {}
    for section in parser.sections():
        where = '{}: [{}]'.format(filename, section)
        kind, _, rest = section.partition(':')
        items = dict(parser.items(section))
        if kind == 'pve' and rest:
            _check_keys(where, items, CLUSTER_KEYS)
            clusters[rest] = _parse_cluster(where, rest, items)
        elif kind == 'storage' and rest.count(':') == 1:
            _check_keys(where, items, STORAGE_KEYS)
            storage = _parse_storage(where, rest, items)
            storages[(storage.cluster, storage.storage, storage.node)] = storage
        else:
            raise ConfigError('{}: unknown section; expected [pve:CLUSTER], '
                              '[storage:CLUSTER:STORAGE] or '
                              '[storage:CLUSTER:STORAGE@NODE]'.format(where))
    for (cluster, storage, node) in storages:
        if cluster not in clusters:
            raise ConfigError('{}: [storage:{}:{}] names cluster {!r}, which has '
                              'no [pve:{}] section'.format(
                                  filename, cluster, storage, cluster, cluster))
    return Config(filename, clusters, storages)


def _config_syntax_problem(exc: configparser.Error, lines: Sequence[str]) -> str:
    """configparser's complaint about `lines`, as what is wrong and how to put
    it right."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return ('line {} ({}) comes before any section; the file starts with a section '
                'line, [pve:CLUSTER], e.g. [pve:mycluster], and its keys follow it'.format(
                    exc.lineno, _shown_line(lines[exc.lineno - 1])))
    if isinstance(exc, configparser.DuplicateSectionError):
        return 'line {}: a second [{}] section; keep one'.format(exc.lineno, exc.section)
    if isinstance(exc, configparser.DuplicateOptionError):
        return 'line {}: [{}] has {}= twice; keep one'.format(exc.lineno, exc.section,
                                                            exc.option)
    if isinstance(exc, configparser.ParsingError):
        lineno = exc.errors[0][0]
        return 'line {} ({}) is no KEY=VALUE line and no [SECTION] line'.format(
            lineno, _shown_line(lines[lineno - 1]))
    return ' '.join(str(exc).split())


def _shown_line(line: str) -> str:
    """A line of the config as a message shows it: the value of password=
    and token= as ***, and the password in api='s URL."""
    line = line.strip()
    key = re.match(r'[^=:\s]*', line).group()
    value = line[len(key):].lstrip(' \t=:')
    if key.lower() in SECRET_KEYS and value:
        return line[:len(line) - len(value)] + '***'
    if key.lower() == 'api' and value:
        return line[:len(line) - len(value)] + _without_password(value)
    return line


def load_config(path: str) -> Config:
    filename = os.path.expanduser(path)
    try:
        with open(filename, encoding='utf-8') as fp:
            text = fp.read()
            mode = os.fstat(fp.fileno()).st_mode
    except OSError as exc:
        raise ConfigError('{}: cannot read config: {}; write one as man planb-pvesync '
                          'shows under CONFIGURATION, or name another with -f'.format(
                              path, exc.strerror))
    config = parse_config(text, path)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # It holds a password or token; and whoever may write it chooses
        # what the tool runs (ssh_options=).
        raise ConfigError('{}: users other than its owner may read or change it (mode '
                          '{:04o}), and it holds the API\'s password or token; nothing was '
                          'done; run: chmod 600 {}'.format(
                              path, stat.S_IMODE(mode), shlex.quote(filename)))
    return config


def _check_keys(where, items, allowed):
    for key in items:
        if key not in allowed:
            raise ConfigError('{}: unknown key {!r}; allowed: {}'.format(
                where, key, ', '.join(allowed)))


def _parse_cluster(where, name, items) -> ClusterConfig:
    if 'api' not in items:
        raise ConfigError('{}: missing key api=https://USER@REALM:PASSWORD@HOST'
                          '[:PORT]'.format(where))
    fields = parse_api_url(where, items['api'])
    if 'failover' in items:
        fields['failover'] = tuple(
            _split_host_port(where, 'failover', word, fields['port'])
            for word in re.split(r'[,\s]+', items['failover'].strip()) if word)
    if 'user' in items:
        fields['user'] = _parse_user(where, 'user', items['user'])
    if 'password' in items:
        fields['password'] = items['password']
    if 'token' in items:
        fields.update(_parse_token(where, items['token']))
    if fields.get('password') and fields.get('token_id'):
        raise ConfigError('{}: both a password and a token; keep one'.format(where))
    if not fields.get('user'):
        raise ConfigError('{}: no user; put it in api= (https://USER@REALM:'
                          'PASSWORD@HOST) or set user= or token='.format(where))
    if not (fields.get('password') or fields.get('token_id')):
        raise ConfigError('{}: no password or token; set password= or '
                          'token=USER@REALM!TOKENID=SECRET'.format(where))
    fields.update(_parse_tls(where, items))
    if 'timeout' in items:
        fields['timeout'] = _parse_int(where, 'timeout', items['timeout'])
    fields.update(_parse_retention(where, items))
    ssh = _parse_ssh(where, items)
    if 'ssh_user' in items:
        ssh = dataclasses.replace(ssh, user=items['ssh_user'])
    return ClusterConfig(name=name, ssh=ssh, **fields)


def parse_api_url(where: str, url: str) -> dict:
    """https://[USER@REALM[:PASSWORD]@]HOST[:PORT] -> dict of ClusterConfig fields."""
    if not url.startswith('https://'):
        raise ConfigError('{}: api={!r} must start with https://'.format(
            where, _without_password(url)))
    rest = url[len('https://'):].rstrip('/')
    userinfo, at, hostport = rest.rpartition('@')
    fields = {}
    if at:
        user, colon, password = userinfo.partition(':')
        if '@' not in user and '@' in password:
            raise ConfigError('{}: api= has the realm after a colon; write '
                              'https://USER@REALM:PASSWORD@HOST'.format(where))
        if hostport.count(':') > 1 and not hostport.startswith('['):
            # The origin README's own example, planb@pve:PASS:host:443.
            user_part, _, tail = hostport.partition(':')
            raise ConfigError(
                '{}: api= has a colon where the @ before the host belongs; '
                'write https://{}@{}:PASSWORD@{} (user@realm, colon, password, '
                '@, host)'.format(where, userinfo, user_part,
                                  tail.split(':', 1)[-1]))
        fields['user'] = _parse_user(where, 'api', user)
        if colon:
            fields['password'] = password
    host, port = _split_host_port(where, 'api', hostport)
    fields.update(host=host, port=port)
    return fields


def _without_password(url: str) -> str:
    """`url` with the password of its USER@REALM:PASSWORD@ part as ***."""
    scheme, sep, rest = url.partition('://')
    if not sep:
        scheme, rest = '', url
    userinfo, at, hostport = rest.rpartition('@')
    user, colon, _ = userinfo.partition(':')
    return scheme + sep + (user + colon + '***' if colon else user) + at + hostport


def _split_host_port(where, key, hostport, default_port=DEFAULT_API_PORT):
    match = re.fullmatch(r'(\[[0-9a-fA-F:.]+\]|[^:\[\]/]+)(?::(\d+))?', hostport)
    if not match:
        raise ConfigError('{}: {}= has a bad host {!r}; write HOST or HOST:PORT'.format(
            where, key, hostport))
    return match.group(1), int(match.group(2) or default_port)


def _parse_user(where, key, user):
    name, at, realm = user.partition('@')
    if not (name and at and realm):
        raise ConfigError('{}: {}= user {!r} needs a realm, like planb@pve or '
                          'root@pam'.format(where, key, user))
    return user


def _parse_token(where, token):
    match = re.fullmatch(r'([^@!\s]+@[^@!\s]+)!([^=\s]+)=(\S+)', token)
    if not match:
        raise ConfigError('{}: token= must look like USER@REALM!TOKENID=SECRET'
                          .format(where))
    return {'user': match.group(1), 'token_id': match.group(2),
            'token_secret': match.group(3)}


def _parse_tls(where, items):
    fields = {}
    if 'verify_ssl' in items:
        fields['verify_ssl'] = _parse_bool(where, 'verify_ssl', items['verify_ssl'])
    if 'ca_file' in items:
        fields['ca_file'] = os.path.expanduser(items['ca_file'])
    if 'fingerprint' in items:
        fingerprints = tuple(re.split(r'[,\s]+', items['fingerprint'].strip().upper()))
        if not all(FINGERPRINT_RE.match(fingerprint) for fingerprint in fingerprints):
            raise ConfigError('{}: fingerprint= must be SHA-256 fingerprints, each 32 '
                              'hex pairs joined by colons (one per node, separated by '
                              'spaces)'.format(where))
        fields['fingerprints'] = fingerprints
    if sum(('ca_file' in fields, 'fingerprints' in fields,
            fields.get('verify_ssl') is False)) > 1:
        raise ConfigError('{}: choose one of verify_ssl=no, ca_file= and '
                          'fingerprint='.format(where))
    return fields


def _parse_ssh(where, items) -> SshSettings:
    fields = {}
    if 'ssh_port' in items:
        fields['port'] = _parse_int(where, 'ssh_port', items['ssh_port'])
    if 'ssh_key' in items:     # absolute: ssh runs in / (RunningProcesses.popen)
        fields['key'] = os.path.abspath(os.path.expanduser(items['ssh_key']))
    if 'ssh_cipher' in items:
        fields['ciphers'] = items['ssh_cipher'].strip()
    if 'ssh_options' in items:
        fields['options'] = tuple(shlex.split(items['ssh_options']))
    return SshSettings(**fields)


def _parse_storage(where, rest, items) -> StorageConfig:
    cluster, _, storage_node = rest.partition(':')
    storage, at, node = storage_node.partition('@')
    if not (cluster and storage) or (at and not node):
        raise ConfigError('{}: expected [storage:CLUSTER:STORAGE] or '
                          '[storage:CLUSTER:STORAGE@NODE]'.format(where))
    if 'ssh' not in items:
        raise ConfigError('{}: missing key ssh=USER@HOST'.format(where))
    user, at, host = items['ssh'].rpartition('@')
    if not host or (at and not user):
        raise ConfigError('{}: ssh= must look like USER@HOST'.format(where))
    ssh = dataclasses.replace(_parse_ssh(where, items), user=user or None)
    return StorageConfig(cluster, storage, node or None, host, ssh)


def _parse_retention(where, items) -> dict:
    parsers = dict(keep_source=parse_keep_source, keep_destination=parse_keep_destination)
    fields = {}
    for key, parse in parsers.items():
        if key in items:
            try:
                fields[key] = parse(items[key])
            except ValueError as exc:
                raise ConfigError('{}: {}: {}'.format(where, key, exc))
    return fields


def parse_keep_source(text: str) -> Optional[int]:
    """'all' -> None (keep every one), else a count of 1 or more."""
    if text == 'all':
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError('{!r} is no count; give N (1 or more, {} is the default) '
                         'or all'.format(text, DEFAULT_KEEP_SOURCE))
    return int(text)


def parse_keep_destination(text: str) -> Tuple:
    """'all' -> () (keep every one), else a schedule of KeepRules."""
    return () if text == 'all' else parse_keep_schedule(text)


def _parse_int(where, key, value):
    try:
        return int(value)
    except ValueError:
        raise ConfigError('{}: {}={!r} is not a number'.format(where, key, value))


def _parse_bool(where, key, value):
    words = {'yes': True, 'true': True, 'on': True, '1': True,
             'no': False, 'false': False, 'off': False, '0': False}
    try:
        return words[value.strip().lower()]
    except KeyError:
        raise ConfigError('{}: {}={!r} must be yes or no'.format(where, key, value))


# ==============================================================================
# PVE discovery (the only code that talks to the cluster's API)
# ==============================================================================

# The formats of the names PVE gives (pve-common's JSONSchema: pve-node,
# pve-vmid, dns-name, pve-storage-id; a zfspool volume as ZFSPoolPlugin names
# it), and of ZFS's dataset names (a storage's pool, and every name a zfs
# list answers). What the API or a node says is checked against them before
# it goes into a path, a command or a listing.
PVE_NODE = re.compile(r'[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?')
PVE_VMID = re.compile(r'[1-9][0-9]{2,8}')
DNS_NAME = re.compile(r'({0}\.)*{0}'.format(PVE_NODE.pattern))
PVE_STORAGE_ID = re.compile(r'[A-Za-z][A-Za-z0-9._-]*[A-Za-z0-9]')
PVE_ZFS_VOLUME = re.compile(r'((base|basevol)-[0-9]+-[^\s/]+/)?'
                            r'(vm|base|subvol|basevol)-[0-9]+-[^\s/]+')
ZFS_COMPONENT = re.compile(r'[A-Za-z0-9_.: -]+')
ZFS_MAX_NAME = 255


def is_zfs_name(name: str, marks: str = '') -> bool:
    """Whether `name` is a dataset name as ZFS allows it (a pool, then its
    children); with `marks` '@#', also a snapshot's or a bookmark's."""
    base, mark, short = name, '', ''
    for char in marks:
        if char in name:
            base, mark, short = name.partition(char)
            break
    parts = base.split('/') + ([short] if mark else [])
    return (len(name) <= ZFS_MAX_NAME and base[:1].isascii() and base[:1].isalpha()
            and all(ZFS_COMPONENT.fullmatch(part) and part not in ('.', '..') for part in parts))


def _pve_name(what: str, value, pattern) -> str:
    """`value` as a string, if PVE could have given it; else a PveError."""
    text = str(value)
    if not pattern.fullmatch(text):
        raise PveError('the API answered {} {!r}, which is no name PVE gives; nothing '
                       'was done (is that the cluster\'s API?)'.format(what, text))
    return text


@dataclasses.dataclass(frozen=True)
class PveNode:
    name: str
    online: bool
    ip: Optional[str]

    @property
    def address(self) -> str:
        return self.ip or self.name


@dataclasses.dataclass(frozen=True)
class PveStorage:
    storage: str
    type: str
    enabled: bool
    path: Optional[str]
    pool: Optional[str]
    nodes: Optional[frozenset]      # None: every node
    content: frozenset = frozenset()    # images, rootdir, vztmpl, iso, backup, ...

    def on_node(self, node: str) -> bool:
        return self.nodes is None or node in self.nodes


@dataclasses.dataclass(frozen=True)
class PveVolume:
    key: str                        # the config key: scsi0, efidisk0, rootfs, mp0, ...
    storage: str
    volume: str                     # as in the config: vm-101-disk-0, base-100-disk-0/vm-101-disk-0
    storage_type: Optional[str]     # None: the storage is not visible to us
    dataset: Optional[str]          # pool/name, for ZFS volumes
    boot: bool = False
    skip: Optional[str] = None      # why it is not synced; None: it is

    @property
    def name(self) -> str:
        """The volume's own name (a linked clone's, not its base's)."""
        return self.volume.rsplit('/', 1)[-1]


@dataclasses.dataclass(frozen=True)
class PveGuest:
    vmid: int
    type: str                       # qemu or lxc
    name: Optional[str]
    node: str
    status: str
    template: bool = False
    pool: Optional[str] = None
    tags: Tuple[str, ...] = ()
    volumes: Optional[Tuple[PveVolume, ...]] = None   # None: not read (yet)
    note: Optional[str] = None      # why the volumes are unknown
    agent: bool = False             # the QEMU guest agent is enabled
    config: Optional[dict] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return self.name or str(self.vmid)



@dataclasses.dataclass(frozen=True)
class PveCluster:
    name: str
    nodes: Dict[str, PveNode]
    storages: Dict[str, PveStorage]
    guests: Tuple[PveGuest, ...]


QEMU_VOLUME_KEY = re.compile(r'(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0|unused\d+')
LXC_VOLUME_KEY = re.compile(r'rootfs|mp\d+|unused\d+')


def parse_guest_volumes(guest_type: str, config: dict,
                        storages: Dict[str, PveStorage]) -> Tuple[PveVolume, ...]:
    """The volumes of a guest's config, the boot disk first; pure."""
    key_re = QEMU_VOLUME_KEY if guest_type == 'qemu' else LXC_VOLUME_KEY
    boot_keys = _boot_order(config) if guest_type == 'qemu' else ['rootfs']
    volumes = []
    for key, value in config.items():
        if not key_re.fullmatch(key):
            continue
        source, opts = _split_drive(str(value))
        storage_id, colon, volume = source.partition(':')
        if not colon or opts.get('media') == 'cdrom':
            continue    # an empty drive, a cdrom, a bind mount or a device
        storage = storages.get(storage_id)
        dataset = None
        skip = _skip_reason(guest_type, key, opts, storage)
        if storage and storage.type == 'zfspool' and storage.pool:
            dataset = '{}/{}'.format(storage.pool, volume.rsplit('/', 1)[-1])
            if skip is None:
                _check_zfs_volume(key, storage, volume, dataset)
        volumes.append(PveVolume(
            key=key, storage=storage_id, volume=volume,
            storage_type=storage.type if storage else None, dataset=dataset, skip=skip))
    boot_key = next((k for k in boot_keys if any(v.key == k for v in volumes)), None)
    volumes = [dataclasses.replace(v, boot=True) if v.key == boot_key else v
               for v in volumes]
    return tuple(sorted(volumes, key=lambda v: (not v.boot, _natural_key(v.key))))


def _check_zfs_volume(key, storage, volume, dataset):
    """ValueError unless `volume` on `storage` is named as PVE names the
    volumes of a zfspool storage, in a pool that ZFS could have."""
    if not PVE_ZFS_VOLUME.fullmatch(volume):
        raise ValueError('{} names the volume {!r} on {}, which is no name PVE gives a ZFS '
                         'volume; no volume of it is backed up'.format(
                             key, volume, storage.storage))
    if not is_zfs_name(dataset):
        raise ValueError('storage {} has the pool {!r}, which is no ZFS dataset name; no '
                         'volume of it is backed up; check pool= in PVE\'s storage.cfg'.format(
                             storage.storage, storage.pool))


def _split_drive(value):
    source, *options = value.split(',')
    return source, dict(opt.partition('=')[::2] for opt in options)


def _boot_order(config):
    boot = str(config.get('boot', ''))
    if boot.startswith('order='):
        return boot[len('order='):].split(';')
    return [config['bootdisk']] if config.get('bootdisk') else []


def _agent_enabled(value) -> bool:
    """agent: 1, or agent: enabled=1,fstrim_cloned_disks=1, and the like."""
    first = str(value or '0').split(',')[0]
    return first.partition('=')[2] == '1' if '=' in first else first == '1'


def _skip_reason(guest_type, key, opts, storage):
    if key.startswith('unused'):
        return 'unused'
    if storage is None:
        return 'storage not visible (needs Datastore.Audit)'
    if storage.type != 'zfspool':
        return 'not ZFS'
    if not storage.enabled:
        return 'storage disabled'
    if guest_type == 'qemu' and opts.get('backup') == '0':
        return 'backup=0'
    if key.startswith('mp') and opts.get('backup') != '1':
        return 'no backup=1'
    return None


def _natural_key(key):
    match = re.fullmatch(r'(\D+)(\d*)', key)
    return (key.startswith('unused'), match.group(1), int(match.group(2) or 0))


# ZFS keeps at most this many bytes in a user property.
MAX_PROPERTY_VALUE = 8191


def kept_config(cluster: str, guest: PveGuest) -> Optional[str]:
    """The guest's config as it is kept with each snapshot of its disks:
    compact JSON of where it ran and what the API said (without its digest),
    readable with `zfs get`. A description that does not fit is left out;
    None when even the rest does not fit."""
    config = {key: value for key, value in guest.config.items() if key != 'digest'}
    for attempt in (config, dict(config, description=None)):
        text = json.dumps(dict(cluster=cluster, vmid=guest.vmid, type=guest.type,
                               node=guest.node, config={
                                   k: v for k, v in attempt.items() if v is not None}),
                          sort_keys=True, separators=(',', ':'))
        if len(text.encode()) <= MAX_PROPERTY_VALUE:
            return text
    return None


def parse_kept_config(text: str) -> dict:
    """What kept_config() wrote: cluster, vmid, type, node and config."""
    kept = json.loads(text)
    if not (isinstance(kept, dict) and kept.get('type') in ('qemu', 'lxc')
            and isinstance(kept.get('config'), dict)):
        raise ValueError('not a config that planb-pvesync kept')
    return kept


# Besides reads, what is safe to send twice: a login, a thaw. Not a freeze:
# a second one fails while the first holds, and then no thaw would follow;
# nor what creates, starts or uploads.
REPEATABLE_POSTS = ('/access/ticket', '/fsfreeze-thaw')
API_RETRIES = 3                 # tries after the first, when it is safe
API_BACKOFF = 0.5               # seconds: no wait, then 1 s, then 2 s
API_RETRY_STATUS = (502, 503, 504)


class PveApi:
    """A logged-in connection to a cluster's API.

    proxmoxer builds the paths and raises on errors; the session underneath
    is ours: it pins certificates (the login request's too) and tries again
    what is safe to repeat. When a host does not answer even so, the next one
    of failover= takes its place for the rest of the run.
    """

    TICKET_RENEW_AFTER = 3600   # PVE tickets live two hours

    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster
        self.hosts = ['{}:{}'.format(host, port)
                      for host, port in [(cluster.host, cluster.port), *cluster.failover]]
        self.calls = 0
        self._lock = threading.Lock()
        self._switch = threading.RLock()    # held while logging in or taking over
        import proxmoxer.backends.https
        import proxmoxer.core
        self._session = _api_session_class()(cluster)
        self._roots = [proxmoxer.core.ProxmoxResource(
            base_url='https://{}/api2/json'.format(host), session=self._session,
            serializer=proxmoxer.backends.https.JsonSerializer()) for host in self.hosts]
        self._host = 0                      # the one in use, an index into hosts
        self._passed = []                   # the hosts given up, and why
        self._ticket_time = None
        if cluster.token_id:
            self._session.headers['Authorization'] = 'PVEAPIToken={}!{}={}'.format(
                cluster.user, cluster.token_id, cluster.token_secret)
        else:
            self._login()

    def get(self, path: str, /, **params):
        return self._call('GET', path, params)

    def post(self, path: str, /, **data):
        return self._call('POST', path, data)

    def put(self, path: str, /, **data):
        return self._call('PUT', path, data)

    def upload(self, path: str, filename: str, payload: bytes, /, **form):
        """A file, as PVE takes one: a multipart POST (proxmoxer's resource
        layer sends forms only)."""
        return self._call('POST', path, form, files={'filename': (filename, payload)})

    def wait(self, node: str, upid: str, timeout: int = 900):
        """Wait for the task that a call started (it answered with its UPID);
        a task that fails raises PvesyncError with PVE's words."""
        deadline = time.monotonic() + timeout
        while True:
            task = self.get('nodes/{}/tasks/{}/status'.format(node, upid))
            if task.get('status') == 'stopped':
                outcome = task.get('exitstatus', '')
                if outcome != 'OK' and not outcome.startswith('WARNINGS'):
                    raise PvesyncError('{} on {}: {}'.format(task.get('type', 'task'), node,
                                                             outcome or 'failed'))
                return
            if time.monotonic() > deadline:
                raise PvesyncError('{} on {}: still running after {} s; see its log in '
                                   'PVE\'s task list'.format(task.get('type', upid), node, timeout))
            time.sleep(1)

    def _login(self):
        data = {'username': self.cluster.user, 'password': self.cluster.password}
        answer = self._call('POST', 'access/ticket', data, login=True)
        self._session.cookies.set('PVEAuthCookie', answer['ticket'])
        self._session.headers['CSRFPreventionToken'] = answer['CSRFPreventionToken']
        self._ticket_time = time.monotonic()

    def _ticket_due(self) -> bool:
        return (self._ticket_time is not None and
                time.monotonic() - self._ticket_time > self.TICKET_RENEW_AFTER)

    def _call(self, method, path, args, login=False, files=None):
        import proxmoxer.core
        import requests
        if not login and self._ticket_due():
            with self._switch:
                if self._ticket_due():
                    self._login()
        with self._lock:
            self.calls += 1
            host = self._host
        log.debug('(api) %s /%s %s', method, path,
                  '' if login else ' '.join('{}={}'.format(*kv) for kv in args.items()))
        resource = self._roots[host](path)
        try:
            if files:
                return self._upload(host, path, args, files)
            return getattr(resource, method.lower())(**args)
        except proxmoxer.core.ResourceException as exc:
            raise PveError(self._explain_status(host, method, path, exc),
                           exc.status_code)
        except requests.exceptions.RequestException as exc:
            if (_unanswered(exc) and _repeatable(method, path)
                    and self._take_over(host, exc, login)):
                return self._call(method, path, args, login, files)
            raise PveError(self._explain_transport(host, exc))

    def _take_over(self, failed, exc, login) -> bool:
        """Go on with the next host of failover= when host `failed` does not
        answer (unless another thread did that already); False when there is
        none left. With a password the new host first gets a login."""
        with self._switch:
            if self._host != failed:
                return True
            if failed + 1 == len(self.hosts):
                return False
            self._passed.append('{} ({})'.format(self.hosts[failed], _short_reason(exc)))
            self._host = failed + 1
            log.warning('%s does not answer (%s); going on with %s from failover=',
                        self.hosts[failed], _short_reason(exc), self.hosts[failed + 1])
            if self._ticket_time is not None and not login:
                self._login()
            return True

    def _upload(self, host, path, form, files):
        import proxmoxer.core
        answer = self._session.post('https://{}/api2/json/{}'.format(self.hosts[host], path),
                                    data=form, files=files)
        if answer.status_code != 200:
            raise proxmoxer.core.ResourceException(
                answer.status_code, answer.reason, answer.text)
        return answer.json()['data']

    def _explain_status(self, host, method, path, exc):
        where = self.hosts[host]
        said = (exc.content or exc.status_message or '').strip()
        section = '[pve:{}]'.format(self.cluster.name)
        if exc.status_code == 401:
            what = 'token' if self.cluster.token_id else 'password'
            return '{}: login as {} refused (401 {}); check the {} in {}'.format(
                where, self.cluster.user, said, what, section)
        if exc.status_code == 403:
            privilege = re.search(r'\(([^,]*), ([^)]*)\)', said)
            need = privilege.group(2) if privilege else 'a privilege'
            return ('{}: {} may not {} /{} (403 {}); grant it {} on {} (for '
                    'example the PVEAuditor role)'.format(
                        where, self.cluster.user, method, path, said, need,
                        privilege.group(1) if privilege else '/'))
        return '{}: {} /{} failed: {} {}'.format(
            where, method, path, exc.status_code, said)

    def _explain_transport(self, host, exc):
        import requests
        where = self.hosts[host]
        section = '[pve:{}]'.format(self.cluster.name)
        if isinstance(exc, requests.exceptions.SSLError):
            # With failover= each node shows its own certificate: pin them all.
            pins = self.cluster.fingerprints if self.cluster.failover else ()
            name, port = where.rsplit(':', 1)
            seen = _server_fingerprint(name, int(port))
            return ('{}: its TLS certificate is not trusted ({}); if that is your '
                    'cluster, pin it in {}: fingerprint={}'.format(
                        where, _short_reason(exc), section, ' '.join(pins + (seen,))))
        keys = 'api= and failover=' if self.cluster.failover else 'api='
        if isinstance(exc, requests.exceptions.Timeout) or 'timed out' in str(exc):
            problem = ('no answer within {} s; check {} in {} and the firewall, or '
                       'raise timeout='.format(self.cluster.timeout, keys, section))
        else:
            problem = 'cannot connect ({}); check {} in {}'.format(
                _short_reason(exc), keys, section)
        tried = '; tried before: ' + ', '.join(self._passed) if self._passed else ''
        return '{}: {}{}'.format(where, problem, tried)


def _repeatable(method: str, path: str) -> bool:
    return method == 'GET' or ('/' + path.split('?')[0]).endswith(REPEATABLE_POSTS)


def _unanswered(exc) -> bool:
    """The host did not answer (even when asked again): another may."""
    import requests
    return (isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))
            and not isinstance(exc, requests.exceptions.SSLError))


@functools.lru_cache(maxsize=None)
def _api_session_class():
    """The HTTP session PveApi uses, defined (and requests, urllib3 and
    proxmoxer imported) when the first one is made: a command that never calls
    the API starts in half the time without them."""
    import requests.adapters
    import urllib3.util

    class ApiSession(requests.Session):
        """A session with a time-out on every request (proxmoxer sets none), whose
        own `verify` wins over REQUESTS_CA_BUNDLE in the environment. Its adapters
        try again what is safe to repeat, and with fingerprint= accept only a
        pinned certificate."""

        def __init__(self, cluster: ClusterConfig):
            super().__init__()
            self.timeout = cluster.timeout
            self.pins = cluster.fingerprints
            # With pins the adapter checks the certificate instead.
            self.verify = False if self.pins else cluster.ca_file or cluster.verify_ssl
            # One TLS context for every connection: urllib3 would make one per
            # connection and load the system's CA certificates into each, which
            # costs more than the handshake, and none of them is used here.
            self.tls = None
            if self.verify is False:
                warnings.filterwarnings(
                    'ignore', category=urllib3.exceptions.InsecureRequestWarning)
                self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE
            self._adapters = {}     # (host:port, a POST safe to repeat) -> ApiAdapter
            self._adapters_lock = threading.Lock()

        def request(self, *args, **kwargs):
            kwargs.setdefault('timeout', self.timeout)
            kwargs.setdefault('verify', self.verify)
            return super().request(*args, **kwargs)

        def get_adapter(self, url):
            parts = urllib.parse.urlsplit(url)
            key = (parts.netloc, parts.path.endswith(REPEATABLE_POSTS))
            with self._adapters_lock:
                if key not in self._adapters:
                    self._adapters[key] = ApiAdapter(api_retry(key[1]), self._pin(parts),
                                                     self.tls)
                return self._adapters[key]

        def _pin(self, parts) -> Optional[str]:
            """The fingerprint this host must show. With one per node: the one it
            shows, if pinned; else the first, and the connection fails on that."""
            if len(self.pins) < 2:
                return self.pins[0] if self.pins else None
            seen = _server_fingerprint(parts.hostname, parts.port)
            return seen if seen in self.pins else self.pins[0]

        def close(self):
            for adapter in self._adapters.values():
                adapter.close()
            super().close()

    class ApiAdapter(requests.adapters.HTTPAdapter):
        """Tries again as `retry` says; with a fingerprint, accepts exactly the
        certificate with that SHA-256 fingerprint; with `tls`, connects with
        that context."""

        def __init__(self, retry, fingerprint=None, tls=None):
            self.fingerprint = fingerprint.replace(':', '').lower() if fingerprint else None
            self.tls = tls
            super().__init__(pool_maxsize=CONFIG_WORKERS, max_retries=retry)

        def init_poolmanager(self, *args, **kwargs):
            if self.fingerprint:
                kwargs['assert_fingerprint'] = self.fingerprint
            if self.tls:
                kwargs['ssl_context'] = self.tls
            super().init_poolmanager(*args, **kwargs)

    class ApiRetry(urllib3.util.Retry):
        """urllib3's Retry, saying each new try with -v."""

        def increment(self, method=None, url=None, response=None, error=None, **kwargs):
            retry = super().increment(method, url, response, error, **kwargs)
            why = (_short_reason(error) if error is not None
                   else '{} {}'.format(response.status, response.reason))
            wait = retry.get_backoff_time()
            log.info('(api) %s %s: %s; trying again %s (%d of %d)', method, url, why,
                     'in {:.0f} s'.format(wait) if wait else 'at once', len(retry.history),
                     API_RETRIES)
            return retry

    def api_retry(posts_too: bool) -> ApiRetry:
        """A connection that could not be made is tried again always; a request
        whose answer was lost, or that got 502, 503 or 504, only when it is safe
        to send twice: a read, and with `posts_too` a POST. Anything else (a
        certificate refused) is not."""
        return ApiRetry(total=API_RETRIES, other=0, backoff_factor=API_BACKOFF,
                        status_forcelist=API_RETRY_STATUS, raise_on_status=False,
                        allowed_methods=frozenset({'GET', 'POST'} if posts_too else {'GET'}))

    return ApiSession


def _server_fingerprint(host, port) -> str:
    """The SHA-256 fingerprint of the certificate the server shows, PVE-style."""
    try:
        pem = ssl.get_server_certificate((host.strip('[]'), port), timeout=5)
    except (OSError, ValueError) as exc:
        return '(could not read it: {})'.format(exc)
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ':'.join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _short_reason(exc) -> str:
    """The innermost reason of a requests/urllib3 error, on one line (without
    the place in OpenSSL's source that some end with, '(_ssl.c:992)')."""
    text = re.sub(r' \(_ssl\.c:\d+\)', '', str(exc))
    for pattern in (r'Fingerprints did not match', r'\[SSL[^\]]*\][^'"'"'")]*',
                    r'\[Errno[^\]]*\][^'"'"'")]*', r'Name or service not known',
                    r'Remote end closed connection without response',
                    r'(Read|Connection to \S+) timed out'):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip().rstrip('.')
    return ' '.join(text.split())[:200]


def read_cluster(api: PveApi, name: str) -> PveCluster:
    """Nodes, storages and guests (without their volumes): three API calls."""
    resources = api.get('cluster/resources')
    storage_cfg = api.get('storage')
    status = api.get('cluster/status')
    ips = {item['name']: _node_ip(item) for item in status if item['type'] == 'node'}
    nodes = {}
    for item in resources:
        if item['type'] == 'node':
            node = _pve_name('node name', item['node'], PVE_NODE)
            nodes[node] = PveNode(node, item.get('status') == 'online', ips.get(node))
    storages = {item['storage']: _parse_storage_entry(item) for item in storage_cfg}
    guests = tuple(sorted(
        (_parse_guest_entry(item) for item in resources
         if item['type'] in ('qemu', 'lxc')),
        key=lambda g: g.vmid))
    return PveCluster(name, dict(sorted(nodes.items())), storages, guests)


def _node_ip(item) -> Optional[str]:
    """The address /cluster/status gives a node, if it is an IP address."""
    ip = item.get('ip')
    if ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise PveError('the API answered node {!r} the address {!r}, which is no IP '
                           'address; nothing was done'.format(item.get('name'), ip))
    return ip


def _parse_storage_entry(item) -> PveStorage:
    nodes = item.get('nodes')
    return PveStorage(
        storage=_pve_name('storage', item['storage'], PVE_STORAGE_ID), type=item['type'],
        enabled=not int(item.get('disable', 0)),
        path=item.get('path'), pool=item.get('pool'),
        nodes=frozenset(_pve_name('node name', n.strip(), PVE_NODE)
                        for n in nodes.split(',')) if nodes else None,
        content=frozenset(c.strip() for c in item.get('content', '').split(',') if c.strip()))


def _parse_guest_entry(item) -> PveGuest:
    """A guest of /cluster/resources. A name PVE would not give (a DNS name,
    or 'VM VMID' for a VM without one: no '/', no newline, no '_' of the
    tool's own _restore) is not used: the guest is listed by its vmid, with a
    note, and is not backed up."""
    name, note = item.get('name'), None
    if name is not None and not (DNS_NAME.fullmatch(name) or name == 'VM {}'.format(item['vmid'])):
        name, note = None, ('its name {!r} is no name PVE gives (a DNS name), so it is not '
                            'backed up; is that the cluster\'s API?'.format(name))
    return PveGuest(
        vmid=int(_pve_name('vmid', item['vmid'], PVE_VMID)), type=item['type'], name=name,
        node=_pve_name('node name', item['node'], PVE_NODE),
        status=item.get('status', 'unknown'),
        template=bool(int(item.get('template', 0))), pool=item.get('pool'),
        tags=tuple(t for t in re.split(r'[;, ]', item.get('tags', '')) if t), note=note)


@dataclasses.dataclass(frozen=True)
class GuestSelection:
    """Which guests a command is about: named ones, all, by pool or tag."""
    names: Tuple[str, ...] = ()     # vmids or names (-g)
    all: bool = False
    pools: Tuple[str, ...] = ()
    tags: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()   # vmids or names
    templates: bool = False         # also templates picked by --all/--pool/--tag

    @property
    def empty(self) -> bool:
        return not (self.names or self.all or self.pools or self.tags)


def select_guests(cluster: PveCluster, selection: GuestSelection) -> Tuple[PveGuest, ...]:
    """The guests `selection` names, in vmid order; every guest when it is
    empty. Guests named with -g are taken even when they are templates."""
    if selection.empty:
        return cluster.guests
    chosen = {find_guest(cluster, word).vmid for word in selection.names}
    chosen |= _guests_by_group(cluster, selection)
    for word in selection.exclude:
        try:
            chosen.discard(find_guest(cluster, word).vmid)
        except UsageError as exc:
            log.warning('--exclude: %s', exc)
    return tuple(g for g in cluster.guests if g.vmid in chosen)


def _guests_by_group(cluster, selection):
    """The vmids that --all, --pool and --tag pick."""
    picked = set()
    for guest in cluster.guests:
        if guest.template and not selection.templates:
            continue
        if (selection.all or guest.pool in selection.pools
                or set(guest.tags) & set(selection.tags)):
            picked.add(guest.vmid)
    for kind, wanted, has in (('pool', selection.pools, lambda g, w: g.pool == w),
                              ('tag', selection.tags, lambda g, w: w in g.tags)):
        for word in wanted:
            if not any(has(g, word) for g in cluster.guests):
                raise UsageError('no guest in cluster {} has {} {!r}'.format(
                    cluster.name, kind, word))
    return picked


def find_guest(cluster: PveCluster, word: str) -> PveGuest:
    """The one guest with vmid or name `word`."""
    matches = [g for g in cluster.guests if str(g.vmid) == word or g.name == word]
    if not matches:
        raise UsageError('no guest {!r} in cluster {} (or the API user lacks '
                         'VM.Audit on it)'.format(word, cluster.name))
    if len(matches) > 1:
        raise UsageError('guest name {!r} is ambiguous in cluster {}: {}; '
                         'give the vmid'.format(word, cluster.name, ', '.join(
                             '{} on {}'.format(g.vmid, g.node) for g in matches)))
    return matches[0]


def read_guest_volumes(api: PveApi, cluster: PveCluster,
                       guests: Sequence[PveGuest]) -> Tuple[PveGuest, ...]:
    """The guests with their volumes: one config call per guest, concurrently."""
    def read_one(guest):
        node = cluster.nodes.get(guest.node)
        if guest.note:
            return guest
        if node is not None and not node.online:
            return dataclasses.replace(
                guest, note='node {} is offline'.format(guest.node))
        try:
            config = api.get('nodes/{}/{}/{}/config'.format(
                guest.node, guest.type, guest.vmid))
        except PveError as exc:
            if exc.status == 500 and 'does not exist' in str(exc):
                raise PveError('guest {} ({}) vanished from node {} between two API '
                               'calls (migrated or deleted); run again'.format(
                                   guest.vmid, guest.label, guest.node))
            raise
        try:
            volumes = parse_guest_volumes(guest.type, config, cluster.storages)
        except ValueError as exc:
            return dataclasses.replace(guest, note=str(exc))
        return dataclasses.replace(
            guest, agent=_agent_enabled(config.get('agent')), config=config, volumes=volumes)

    with ThreadPoolExecutor(max_workers=CONFIG_WORKERS) as pool:
        return tuple(pool.map(read_one, guests))


# ==============================================================================
# Running commands: process pipelines, here or over ssh
# ==============================================================================

BROKEN_PIPE = (-signal.SIGPIPE, 128 + signal.SIGPIPE)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) arrived: every running
    pipeline was ended, and no new one starts."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@functools.lru_cache(maxsize=None)
def _parent_death_programs() -> bool:
    have = all(shutil.which(name) for name in ('setpriv', 'timeout'))
    if not have:
        log.info('no setpriv or timeout here: a stage may outlive the tool when it is killed')
    return have


def ending_with_tool(argv: Sequence[str]) -> List[str]:
    """`argv` as a stage that gets SIGTERM when the tool ends, however it
    ends: setpriv sets the parent-death signal, which the kernel sends when
    the thread that started the stage is gone (each waits for its stages).
    The signal does not survive the exec of a setuid program, so sudo runs
    under timeout, which never times out (0) but passes the signal on to
    sudo, and sudo on to its command: a receive keeps what it got (recv -s),
    as when the tool stops it itself. A stage on another host ends when its
    ssh does."""
    if not _parent_death_programs():
        return list(argv)
    guard = ['timeout', '--foreground', '0'] if argv[0] == 'sudo' else []
    return ['setpriv', '--pdeathsig', 'TERM', '--', *guard, *argv]


class RunningProcesses:
    """The processes of every running pipeline, in all threads, so that a
    stop signal ends them all at once: a Ctrl-C at a terminal reaches them by
    itself, a SIGTERM to the tool alone does not.

    Whatever ends the tool, even a SIGKILL (PlanB's task timeout, the OOM
    killer), its stages end with it: each runs with a parent-death signal
    (ending_with_tool), and inherits the locks of the datasets its thread
    works on (holding), so that no later run overlaps a stage still alive."""

    def __init__(self):
        # Reentrant: the signal handler runs in the main thread, which may
        # hold the lock when the signal arrives.
        self._lock = threading.RLock()
        self._procs = set()
        self._thread = threading.local()    # .starting, .held
        self.stopped_by = None      # the first stop signal's number

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        """subprocess.Popen, tracked until discard(). A stop signal that
        arrives meanwhile ends the new process too; check() then raises."""
        self._thread.starting = True
        try:
            if shutil.which(argv[0]) is None:     # as Popen would say, not setpriv
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
            # In /: the working directory may be PlanB's mount, which PlanB
            # unmounts after the run; an idle ssh master outlives a kill.
            proc = subprocess.Popen(ending_with_tool(argv), pass_fds=self.held(), cwd='/',
                                    **kwargs)
            with self._lock:
                self._procs.add(proc)
                if self.stopped_by:
                    proc.terminate()
        finally:
            self._thread.starting = False
        return proc

    @contextlib.contextmanager
    def holding(self, fds: Sequence[int]):
        """Every process this thread starts meanwhile inherits `fds` (the
        locks of the datasets it works on): an flock lasts as long as any
        process holds it open. sudo keeps them open in its own process, which
        lives as long as its command, and closes them for the command."""
        before = self.held()
        self._thread.held = before + tuple(fds)
        try:
            yield
        finally:
            self._thread.held = before

    def held(self) -> Tuple[int, ...]:
        return getattr(self._thread, 'held', ())

    def discard(self, procs):
        with self._lock:
            self._procs.difference_update(procs)

    def check(self):
        """Raise Stopped once a stop signal came: nothing new starts then."""
        if self.stopped_by:
            raise Stopped(self.stopped_by)

    def on_signal(self, signum, frame):
        """The handler of the stop signals: SIGTERM to every tracked process
        (zfs recv -s keeps what it received), SIGKILL at a second signal;
        then Stopped in the main thread, unless it is starting a process
        (then its check() raises it)."""
        with self._lock:
            first = self.stopped_by is None
            self.stopped_by = self.stopped_by or signum
            for proc in self._procs:
                (proc.terminate if first else proc.kill)()
        if first and not getattr(self._thread, 'starting', False):
            raise Stopped(signum)


RUNNING = RunningProcesses()


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str                       # for messages: 'zstd', 'pve1: zfs send | zstd'
    argv: List[str]
    show_stderr: bool = False       # pass stderr through (pv's progress bar)


def run_pipeline(stages: Sequence[Stage], capture=False) -> str:
    """Run `stages` with each one's stdout piped into the next one's stdin.

    Data flows between the processes, never through Python. Every stage's exit
    status is checked; a CommandError names the stage that failed first, in
    its own words, then the others. Returns the last stage's stdout when
    `capture`.
    """
    log.debug('(exec) %s', ' | '.join(shlex.join(s.argv) for s in stages))
    running = []
    ended = []      # indexes into `running`, in the order the processes ended
    watchers = []
    try:
        RUNNING.check()                 # nothing starts once the run is stopping
        stdin = subprocess.DEVNULL
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            errors = None if stage.show_stderr else tempfile.TemporaryFile()
            try:
                proc = RUNNING.popen(
                    stage.argv, stdin=stdin, stderr=errors,
                    stdout=subprocess.PIPE if capture or not last else subprocess.DEVNULL)
            except OSError as exc:
                raise CommandError([(stage.name, 127, '{}: {}'.format(
                    stage.argv[0], exc.strerror))])
            if stdin is not subprocess.DEVNULL:
                stdin.close()           # the next stage holds it now
            stdin = proc.stdout
            watchers.append(_watch_exit(proc, len(running), ended))
            running.append((stage, proc, errors))
            RUNNING.check()
        output = running[-1][1].stdout.read() if capture else b''
        for watcher in watchers:
            watcher.join()
        RUNNING.check()                 # a stop, not a failure, ended them
    except BaseException:
        for _, proc, _ in running:
            if proc.poll() is None:
                proc.terminate()        # zfs recv -s keeps what it received
        for _, proc, _ in running:
            proc.wait()
        raise
    finally:
        RUNNING.discard([proc for _, proc, _ in running])
        for _, proc, _ in running:
            if proc.stdout:
                proc.stdout.close()
    failed = [(stage.name, proc.returncode, _read_tail(errors))
              for stage, proc, errors in (running[i] for i in ended)
              if proc.returncode != 0]
    for name, code, err in failed:
        log.debug('(exec) %s failed (%s): %s', name, exit_text(code), err)
    # A stage killed by a broken pipe only shows that a later one died first.
    failed = [f for f in failed if f[1] not in BROKEN_PIPE] or failed
    failed.sort(key=_blame_rank)
    for _, _, errors in running:
        if errors:
            errors.close()
    if failed:
        raise CommandError(failed, output.decode(errors='replace'))
    return output.decode(errors='replace')


# What a stage says when a neighbour ended before it: the one after it (a
# broken pipe; not ssh's network connection breaking, which it words so too)
# or the one before it (its input ends mid-stream).
NEIGHBOUR_ENDED = re.compile(r'^(?!.*(disconnect|connection to)).*broken pipe|unexpected end of '
                             r'file|premature end|incomplete stream|unfinished stream', re.I | re.M)


def _blame_rank(failure) -> int:
    """Failures in the order they ended are sorted by this, stably: first
    those killed by a signal and those that say why in words of their own,
    then the silent ones (ssh exits 255 without a word when its output pipe
    breaks), then those that only say a neighbour ended: an upstream stage
    and the one reading from it may end within a millisecond of each other,
    in either order."""
    _, code, err = failure
    if code < 0 or 128 < code <= 128 + 64:      # a remote shell reports 128 + signal
        return 0
    if NEIGHBOUR_ENDED.search(err):
        return 2
    return 0 if err.strip() else 1


def _watch_exit(proc, index, ended) -> threading.Thread:
    """A thread that waits for `proc` and then appends `index` to `ended`:
    the order in which a pipeline's processes end tells cause from effect."""
    def wait():
        proc.wait()
        ended.append(index)
    watcher = threading.Thread(target=wait, name='wait-{}'.format(proc.pid), daemon=True)
    watcher.start()
    return watcher


def _read_tail(errors, limit=4000) -> str:
    if errors is None:
        return ''
    errors.seek(0)
    return errors.read()[-limit:].decode(errors='replace').strip()


class Host:
    """Where commands run; subclasses say how (`stages`)."""
    sudo: List[str]             # set by each subclass
    may_set: Optional[frozenset] = None     # the properties zfs may set; None: all

    def zfs(self, *args: str) -> List[str]:
        return self.sudo + ['zfs', *args]

    def run(self, cmd: Sequence[str], needs: Sequence[str] = ()) -> str:
        """`cmd`'s output. With `needs`, first checks that this host has
        those programs, in the same round trip: MissingPrograms if not."""
        return run_pipeline(self.stages([cmd], needs), capture=True)

    def run_all(self, cmds: Sequence[Sequence[str]]):
        """Each of `cmds`; here every one runs even when another fails."""
        failed = []
        for cmd in cmds:
            try:
                self.run(cmd)
            except CommandError as exc:
                failed += exc.failed
        if failed:
            raise CommandError(failed)


class LocalHost(Host):
    """This machine. Commands run without a shell; zfs with sudo, unless as
    root or with `may_set`: the zfs permissions this user holds by
    delegation (zfs allow), and then without."""
    name = 'localhost'
    is_remote = False

    def __init__(self, may_set: Optional[Collection[str]] = None):
        self.may_set = None if may_set is None else frozenset(may_set)
        self.sudo = [] if os.geteuid() == 0 or may_set is not None else ['sudo', '-n']

    def stages(self, cmds: Sequence[Sequence[str]], needs: Sequence[str] = ()) -> List[Stage]:
        """The local process stages that run `cmds` piped into each other."""
        missing = [name for name in needs if not shutil.which(name)]
        if missing:
            raise MissingPrograms(missing)
        return [Stage(_command_name(cmd), list(cmd)) for cmd in cmds]

    def run(self, cmd: Sequence[str], needs: Sequence[str] = ()) -> str:
        """As Host.run; a zfs list or get that fails for want of OpenZFS or of
        the sudo rule raises NotSetUp. Every command begins with one of those."""
        try:
            return super().run(cmd, needs)
        except CommandError as exc:
            reads = list(cmd[len(self.sudo):len(self.sudo) + 2]) in (['zfs', 'list'],
                                                                     ['zfs', 'get'])
            problem = reads and setup_problem(exc.failed[0], pwd.getpwuid(os.geteuid()).pw_name,
                                              socket.gethostname(), find_zfs())
            if problem:
                raise NotSetUp(problem) from exc
            raise


class NotSetUp(PvesyncError):
    """This host lacks what every command here needs (OpenZFS, the sudo rule
    for zfs): its first command, a read, fails before anything is changed."""
    exit_code = EXIT_CANNOT_START


# How a missing sudo rule and a missing zfs show on this host: sudo's own
# words, or those of the exec that found no program.
SUDO_REFUSED = re.compile(r'^sudo: (a password is required|a terminal is required|'
                          r'.* is not in the sudoers file|.* is not allowed to execute)', re.M)
NOT_FOUND = re.compile(r'^(sudo: )?(zfs|sudo): (command not found|No such file or directory)$',
                       re.M)
SUDOERS_FILE = '/etc/sudoers.d/planb-pvesync'
ZFS_PATH = '/usr/sbin/zfs'      # where Debian's zfsutils-linux puts it


# Where sudo looks for a program, in its order (Debian's secure_path).
SUDO_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'


def find_zfs() -> Optional[str]:
    """The zfs that sudo runs here (and a sudoers line must name), if any."""
    return shutil.which('zfs', path=SUDO_PATH)


def setup_problem(failure, user: str, host: str, zfs: Optional[str]) -> Optional[str]:
    """What a failed local command (the first failure of a CommandError) says
    about this host's setup, as a message with the fix; None when it is no
    such problem. `zfs` is where zfs is here (None: nowhere), for sudo
    refuses a program it cannot find as one it may not run."""
    _, _, err = failure
    missing = NOT_FOUND.search(err)
    refused = SUDO_REFUSED.search(err)
    if (missing or refused) and (zfs is None or missing and missing.group(2) == 'zfs'):
        return ('zfs is not installed on this host ({}), where the backups are kept; '
                'install OpenZFS (Debian: apt-get install zfs-dkms zfsutils-linux, from '
                'contrib) and make the pool; nothing was done'.format(host))
    sudoers_line = '{} ALL=(root) NOPASSWD: {}'.format(user, zfs or ZFS_PATH)
    if missing:
        return ('sudo is not installed on this host ({}); install it (apt-get install '
                'sudo), then add the line "{}" in {} (visudo -f {}); nothing was '
                'done'.format(host, sudoers_line, SUDOERS_FILE, SUDOERS_FILE))
    if refused:
        return ('{} may not run zfs with sudo on this host ({}): {}; add the line "{}" '
                'in {} (visudo -f {}); nothing was done'.format(
                    user, host, refused.group(0), sudoers_line, SUDOERS_FILE,
                    SUDOERS_FILE))
    return None


# What a remote command runs first when it needs programs (Host.run): every
# one it lacks named in one line, and the exit status a shell gives a command
# it cannot find.
PROGRAM_CHECK = ('m=; for c in {}; do command -v "$c" >/dev/null || m="$m $c"; done; '
                 '[ -z "$m" ] || {{ echo "planb-pvesync: not installed:$m" >&2; exit 127; }}; ')
PROGRAMS_MISSING = re.compile(r'^planb-pvesync: not installed: (.*)$', re.M)


class MissingPrograms(PvesyncError):
    """A host lacks programs that a command needs."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        super().__init__('not installed: ' + ', '.join(self.names))


class SshHost(Host):
    """A host reached with ssh: one master connection for the whole run,
    BatchMode so that cron never waits at a prompt."""
    is_remote = True

    def __init__(self, address: str, settings: SshSettings, control_dir: str):
        self.address = address
        self.settings = settings
        self.name = settings.argv(address)[-1]
        self.sudo = [] if settings.user == 'root' else ['sudo', '-n']
        self._control_path = os.path.join(control_dir, '%C')

    def ssh_argv(self) -> List[str]:
        user_words = self.settings.argv(self.address)
        runtime = ['-o', 'BatchMode=yes', '-o', 'ConnectTimeout=20',
                   '-o', 'ServerAliveInterval=15', '-o', 'ServerAliveCountMax=4',
                   '-o', 'ControlMaster=auto', '-o', 'ControlPersist=60',
                   '-o', 'ControlPath=' + self._control_path]
        if not self.settings.ciphers:
            runtime += ['-c', DEFAULT_SSH_CIPHERS]
        return user_words[:1] + runtime + user_words[1:]

    def stages(self, cmds: Sequence[Sequence[str]], needs: Sequence[str] = ()) -> List[Stage]:
        """One ssh stage that runs `cmds` piped into each other remotely."""
        name = '{}: {}'.format(self.address, ' | '.join(map(_command_name, cmds)))
        check = PROGRAM_CHECK.format(shlex.join(needs)) if needs else ''
        return [Stage(name, self.ssh_argv() + ['--', check + remote_command(cmds)])]

    def run(self, cmd: Sequence[str], needs: Sequence[str] = ()) -> str:
        try:
            return super().run(cmd, needs)
        except CommandError as exc:
            missing = PROGRAMS_MISSING.search(exc.stderr)
            if needs and missing:
                raise MissingPrograms(missing.group(1).split())
            raise

    def run_all(self, cmds: Sequence[Sequence[str]]):
        """Each of `cmds` in one ssh session; every one runs even when
        another fails."""
        script = 'rc=0; {}; exit $rc'.format('; '.join(
            '{} || rc=1'.format(shlex.join(cmd)) for cmd in cmds))
        stage = Stage('{}: {} command(s)'.format(self.address, len(cmds)),
                      self.ssh_argv() + ['--', script])
        run_pipeline([stage], capture=True)

    def close(self):
        subprocess.run(['ssh', '-o', 'ControlPath=' + self._control_path,
                        '-O', 'exit', self.address],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def _command_name(cmd: Sequence[str]) -> str:
    """'zfs send' for ['sudo', '-n', 'zfs', 'send', ...], 'zstd' for ['zstd', ...]."""
    words = list(cmd)
    if words[:2] == ['sudo', '-n']:
        words = words[2:]
    return ' '.join(words[:2]) if words[0] == 'zfs' else words[0]


def remote_command(cmds: Sequence[Sequence[str]]) -> str:
    """The shell text for `cmds` piped into each other, every word quoted.

    A pipe runs under bash -o pipefail so that a failing zfs send fails the
    whole remote command, not only the stream the other end receives.
    """
    text = ' | '.join(shlex.join(cmd) for cmd in cmds)
    if len(cmds) > 1:
        return shlex.join(['bash', '-o', 'pipefail', '-c', text])
    return text


# ==============================================================================
# ZFS listing and the sync planner (pure: no I/O, no clock, no logging)
# ==============================================================================

# Where a backup came from, recorded on it as user properties planb-pvesync:KEY;
# and on a restored volume, the backup and restore point it was made from
# (restored-from=BACKUP@POINT, which only that restore's receive sets).
PROPERTY_PREFIX = 'planb-pvesync:'
RECORDED_KEYS = ('cluster', 'node', 'storage', 'volume', 'vmid', 'source', 'restored-from')
# Who made a snapshot: the guid of the PlanB install, as PlanB's own zfssync
# marks its snapshots (planb-transport, with SyncOptions.owner).
OWNER_PROPERTY = 'planb:owner'
# The receipt: when this host received a snapshot (its own clock, UTC, as
# RECEIPT_TIME), and from which node. This host sets it on each snapshot it
# receives, right after the receive, and reads only the value it set itself
# (zfs get -s local): a stream's snapshots may bring values of their own.
# Retention ages a backup by it, never by a name or creation time a node gave.
RECEIVED = PROPERTY_PREFIX + 'received'
RECEIVED_FROM = PROPERTY_PREFIX + 'received-from'
RECEIPT_TIME = '%Y-%m-%dT%H:%M:%SZ'
ZFS_LIST_PROPS = ('name', 'type', 'guid', 'createtxg', 'creation', 'written',
                  'logicalreferenced', 'used', 'encryption', 'keystatus', 'encryptionroot',
                  'receive_resume_token', 'clones',
                  *(PROPERTY_PREFIX + key for key in RECORDED_KEYS), OWNER_PROPERTY)
# Each type zfs lists, and the mark in the name of one.
ZFS_TYPES = {'filesystem': '', 'volume': '', 'snapshot': '@', 'bookmark': '#'}
# PVE's own short-lived snapshots: replication, migration and vzdump; PVE
# deletes them by itself, so they are no base to build on.
TRANSIENT_SNAPSHOT = re.compile(r'__.*|vzdump')


@dataclasses.dataclass(frozen=True)
class Snapshot:
    name: str                       # the part after @ (or # for a bookmark)
    guid: int
    createtxg: int
    creation: int = 0               # seconds since the epoch
    written: int = 0                # bytes since the previous snapshot
    size: int = 0                   # logicalreferenced: a full stream's size
    bookmark: bool = False
    cloned: bool = False            # a clone depends on it (a mounted restore point)
    owner: Optional[str] = None     # OWNER_PROPERTY; bookmarks have none
    received: Optional[int] = None  # its receipt (RECEIVED, with_receipts), in epoch seconds

    @property
    def ref(self) -> str:
        return ('#' if self.bookmark else '@') + self.name


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    type: str                       # filesystem or volume
    written: int = 0                # bytes changed since the newest snapshot
    encrypted: bool = False
    encryption_root: Optional[str] = None   # the dataset whose key this one uses
    resume_token: Optional[str] = None
    snapshots: Tuple[Snapshot, ...] = ()    # oldest first, bookmarks too
    used: int = 0                   # bytes, with its snapshots
    recorded: Dict[str, str] = dataclasses.field(default_factory=dict)  # RECORDED_KEYS
    key_loaded: bool = True         # False: encrypted, and its key is not loaded


def zfs_list_args(datasets: Sequence[str], depth: int = 1) -> List[str]:
    return ['list', '-H', '-p', '-o', ','.join(ZFS_LIST_PROPS),
            '-t', 'filesystem,volume,snapshot,bookmark', '-d', str(depth),
            *datasets]


def parse_zfs_list(text: str) -> Dict[str, Dataset]:
    """`zfs list -H -p -o ZFS_LIST_PROPS` output -> datasets by name. A line
    that ZFS would not print (a node's answer is a stranger's) is a
    ValueError that names it."""
    fields, points = {}, {}
    for line in text.splitlines():
        row = dict(zip(ZFS_LIST_PROPS, line.split('\t')))
        name = row['name']
        if not _listed_as_zfs_lists(line, row):
            raise ValueError('a line that is no zfs list of ZFS\'s: {!r}'.format(line[:200]))
        if row['type'] in ('snapshot', 'bookmark'):
            parent, _, short = re.split(r'([@#])', name, maxsplit=1)
            points.setdefault(parent, []).append(Snapshot(
                name=short, guid=int(row['guid']), createtxg=int(row['createtxg']),
                creation=_int(row['creation']), written=_int(row['written']),
                size=_int(row['logicalreferenced']),
                bookmark=row['type'] == 'bookmark', cloned=row['clones'] not in ('-', ''),
                owner=_value(row.get(OWNER_PROPERTY))))
        else:
            fields[name] = dict(
                name=name, type=row['type'], written=_int(row['written']),
                used=_int(row['used']),
                encrypted=row['encryption'] not in ('off', '-', ''),
                key_loaded=row['keystatus'] != 'unavailable',
                encryption_root=_value(row['encryptionroot']),
                resume_token=_value(row['receive_resume_token']),
                recorded={key: row[PROPERTY_PREFIX + key] for key in RECORDED_KEYS
                          if row[PROPERTY_PREFIX + key] not in ('-', '')})
    return {name: Dataset(snapshots=tuple(sorted(
        points.get(name, ()), key=lambda s: (s.createtxg, s.bookmark))), **f)
        for name, f in fields.items()}


def _listed_as_zfs_lists(line, row) -> bool:
    """Whether a line of parse_zfs_list could come from zfs itself: every
    column, a known type, a name ZFS allows and of that type, numbers."""
    if line.count('\t') != len(ZFS_LIST_PROPS) - 1 or row['type'] not in ZFS_TYPES:
        return False
    name = row['name']
    mark = next((char for char in '@#' if char in name), '')
    return (mark == ZFS_TYPES[row['type']] and is_zfs_name(name, '@#')
            and row['guid'].isdigit() and row['createtxg'].isdigit())


def up_to(dataset: Dataset, name: Optional[str]) -> Dataset:
    """`dataset` as it was at its snapshot `name`: what came later left out
    (None: all of it)."""
    if name is None:
        return dataset
    cut = next(s for s in dataset.snapshots if not s.bookmark and s.name == name)
    return dataclasses.replace(dataset, written=0, snapshots=tuple(
        s for s in dataset.snapshots if s.createtxg <= cut.createtxg))


def learn_guids(src: Dataset, dst: Optional[Dataset]) -> Dataset:
    """`src` with the guids of this run's new snapshots (listed as guid 0)
    taken from the destination, once they arrived there under the same name."""
    received = {s.name: s.guid for s in (dst.snapshots if dst else ()) if not s.bookmark}
    return dataclasses.replace(src, snapshots=tuple(
        dataclasses.replace(s, guid=received[s.name])
        if s.guid == 0 and s.name in received else s
        for s in src.snapshots))


def parse_receipts(text: str) -> Dict[str, int]:
    """`zfs get -H -p -s local -o name,value RECEIVED` output -> seconds since
    the epoch by snapshot (DATASET@NAME); a value that is no RECEIPT_TIME is
    no receipt."""
    receipts = {}
    for line in text.splitlines():
        name, _, value = line.partition('\t')
        try:
            receipts[name] = calendar.timegm(time.strptime(value, RECEIPT_TIME))
        except ValueError:
            continue
    return receipts


def with_receipts(dataset: Dataset, receipts: Dict[str, int]) -> Dataset:
    """`dataset` with the receipt of each of its snapshots (parse_receipts)."""
    return dataclasses.replace(dataset, snapshots=tuple(
        dataclasses.replace(s, received=receipts.get(dataset.name + s.ref))
        if not s.bookmark else s for s in dataset.snapshots))


def _int(text):
    return int(text) if text.isdigit() else 0


def _value(text):
    """A property's value; None for zfs list's '-' (not set)."""
    return None if text in (None, '-', '') else text


@dataclasses.dataclass(frozen=True)
class SendStep:
    """One zfs send | zfs recv. `base` None: a full stream."""
    snapshot: Snapshot
    base: Optional[Snapshot] = None
    intermediates: bool = False     # -I rather than -i
    estimate: int = 0               # bytes, for pv


@dataclasses.dataclass(frozen=True)
class ResumeStep:
    token: str


@dataclasses.dataclass(frozen=True)
class RollbackStep:
    snapshot: Snapshot              # the destination goes back to this one


@dataclasses.dataclass(frozen=True)
class SyncPlan:
    action: str                     # full, incremental, resume, up-to-date, diverged
    steps: Tuple = ()
    problem: Optional[str] = None   # for diverged: what differs and what to do


def syncable_snapshots(dataset: Dataset) -> Tuple[Snapshot, ...]:
    return tuple(s for s in dataset.snapshots
                 if s.bookmark or not TRANSIENT_SNAPSHOT.fullmatch(s.name))


def plan_sync(src: Dataset, dst: Optional[Dataset], intermediates=True,
              rollback=False, destroy_diverged=False) -> SyncPlan:
    """What brings `dst` to the newest snapshot of `src`. Snapshots are matched
    by guid; bookmarks on the source serve as bases."""
    points = syncable_snapshots(src)
    snapshots = [s for s in points if not s.bookmark]
    if not snapshots:
        return SyncPlan('diverged', problem='{} has no snapshot to send'.format(src.name))
    newest = snapshots[-1]
    if dst is not None and dst.resume_token:
        return SyncPlan('resume', (ResumeStep(dst.resume_token),))
    if dst is None:
        return SyncPlan('full', tuple(_full_steps(snapshots, intermediates)))
    # A snapshot and its bookmark share a guid; prefer the snapshot.
    by_guid = {s.guid: s for s in sorted(points, key=lambda s: not s.bookmark)}
    dst_snaps = [s for s in dst.snapshots if not s.bookmark]
    common = [s for s in dst_snaps if s.guid in by_guid]
    if not common:
        if destroy_diverged:
            return SyncPlan('full', tuple(_full_steps(snapshots, intermediates)))
        what = ('has no snapshot' if not dst_snaps else
                'shares no snapshot with the source (its newest: @{})'.format(
                    dst_snaps[-1].name))
        return SyncPlan('diverged', problem=(
            '{} {}; rename or remove it, or pass --destroy-diverged to replace '
            'it with a full copy'.format(dst.name, what)))
    base_dst = common[-1]
    kept = dst_snaps[:dst_snaps.index(base_dst) + 1]
    newer_on_dst = dst_snaps[len(kept):]
    steps = []
    # ZFS receives a plain incremental past snapshots made on the destination
    # after its base, as long as nothing changed there since; a raw stream
    # only onto the base itself.
    changed = dst.written + sum(s.written for s in newer_on_dst)
    if changed or (newer_on_dst and src.encrypted):
        if not rollback:
            return SyncPlan('diverged', problem=_changed_problem(
                dst, base_dst, newer_on_dst, changed))
        steps.append(RollbackStep(base_dst))
    else:
        kept = dst_snaps
    base = by_guid[base_dst.guid]
    if base.guid == newest.guid:
        return SyncPlan('up-to-date', tuple(steps))
    steps += _incremental_steps(points, base, newest, intermediates)
    clashes = name_clashes(src, steps, kept)
    if clashes:
        return SyncPlan('diverged', problem=_clash_problem(dst, clashes))
    return SyncPlan('incremental', tuple(steps))


def _full_steps(snapshots, intermediates):
    first = snapshots[0] if intermediates else snapshots[-1]
    steps = [SendStep(first, estimate=first.size)]
    if first != snapshots[-1]:
        steps.append(SendStep(snapshots[-1], base=first, intermediates=True,
                              estimate=_written_between(snapshots, first, snapshots[-1])))
    return steps


def _incremental_steps(points, base, newest, intermediates):
    snapshots = [s for s in points if not s.bookmark]
    later = [s for s in snapshots if s.createtxg > base.createtxg]
    if base.bookmark and intermediates and len(later) > 1:
        # -I cannot start at a bookmark: reach the first snapshot after it with
        # -i, then take the rest with -I.
        first = later[0]
        return [SendStep(first, base=base, estimate=first.written),
                SendStep(newest, base=first, intermediates=True,
                         estimate=_written_between(snapshots, first, newest))]
    return [SendStep(newest, base=base, intermediates=intermediates and not base.bookmark,
                     estimate=_written_between(snapshots, base, newest))]


def later_snapshots(dataset: Dataset, snapshot: Snapshot) -> List[Snapshot]:
    """The snapshots of `dataset` after `snapshot`: what a rollback to it destroys."""
    return [s for s in dataset.snapshots if not s.bookmark and s.createtxg > snapshot.createtxg]


def newest_common_guid(src: Dataset, dst: Optional[Dataset]) -> Optional[int]:
    """The guid of the newest snapshot both sides have: the next run's base."""
    on_dst = {s.guid for s in (dst.snapshots if dst else ()) if not s.bookmark}
    common = [s.guid for s in src.snapshots if not s.bookmark and s.guid in on_dst]
    return common[-1] if common else None


def snapshot_spec(dataset: str, snapshots: Sequence[Snapshot]) -> str:
    """DATASET@A,B,C: several snapshots for one zfs destroy."""
    return '{}@{}'.format(dataset, ','.join(s.name for s in snapshots))


def _written_between(snapshots, base, newest):
    return sum(s.written for s in snapshots
               if base.createtxg < s.createtxg <= newest.createtxg)


def name_clashes(src: Dataset, steps: Sequence, dst_snaps: Sequence[Snapshot]
                 ) -> List[Tuple[Snapshot, Snapshot]]:
    """(source snapshot, destination snapshot) for each snapshot the steps
    would send under a name the destination already gives another snapshot:
    zfs recv would refuse it ("destination already exists")."""
    on_dst = {s.name: s for s in dst_snaps}
    clashes = []
    for step in steps:
        if isinstance(step, SendStep):
            for snap in _sent_snapshots(src, step):
                other = on_dst.get(snap.name)
                if other is not None and other.guid != snap.guid:
                    clashes.append((snap, other))
    return clashes


def _sent_snapshots(src, step):
    if not step.intermediates:
        return [step.snapshot]
    return [s for s in src.snapshots if not s.bookmark
            and step.base.createtxg < s.createtxg <= step.snapshot.createtxg]


def _changed_problem(dst, base, newer_on_dst, changed):
    names = ', '.join('@' + s.name for s in newer_on_dst)
    if newer_on_dst and not changed:
        return ('{0} has {1} snapshot(s) after @{2} that the source does not have '
                '({3}); its source is encrypted and sent raw, and ZFS receives a raw '
                'stream only onto the snapshot it starts from; destroy them (zfs '
                'destroy {4}) or pass --rollback, which does that, to continue from '
                '@{2}'.format(dst.name, len(newer_on_dst), base.name, names,
                              snapshot_spec(dst.name, newer_on_dst)))
    if newer_on_dst:
        what = ('has {} snapshot(s) after @{}, the newest one the source still '
                'has ({}), and {} bytes were written after @{}'.format(
                    len(newer_on_dst), base.name, names, changed, base.name))
    else:
        what = 'was changed after its newest snapshot @{} ({} bytes written)'.format(
            base.name, dst.written)
    return ('{} {}; pass --rollback to discard that on the destination and '
            'continue from @{}'.format(dst.name, what, base.name))


def _clash_problem(dst, clashes):
    snap, other = clashes[0]
    more = ' (and {} more: {})'.format(len(clashes) - 1, ', '.join(
        '@' + s.name for s, _ in clashes[1:])) if len(clashes) > 1 else ''
    return ('{0}@{1} is another snapshot than the source\'s @{1}: their guids differ '
            '({2} here, {3} on the source), so the name was used again{4}; nothing '
            'was sent; rename one of them, for example: zfs rename {0}@{1} '
            '{0}@{1}-old'.format(dst.name, snap.name, other.guid, snap.guid, more))


# ==============================================================================
# Retention: thinning the backups, pruning the source (pure: no I/O, no clock)
# ==============================================================================

KEEP_PERIODS = ('all', 'hourly', 'daily', 'weekly', 'monthly', 'yearly')
AGE_UNITS = {'y': 365 * 86400, 'm': 30 * 86400, 'w': 7 * 86400, 'd': 86400, 'h': 3600}
KEEP_RULE_PATTERN = re.compile(r'({}):([1-9][0-9]*)([{}])'.format(
    '|'.join(KEEP_PERIODS), ''.join(AGE_UNITS)))
# A name snapshot_name() made tells when this host asked for the snapshot;
# its creation, when the node made it: a freeze, a slow node or a clock a
# little off keeps them apart by far less than this.
NAME_TIME_SLACK = 3600
KEEP_SCHEDULE_HELP = (
    'PERIOD:AGE with PERIOD all, hourly, daily, weekly, monthly or yearly and '
    'AGE like 36h, 14d, 8w, 6m, 2y (e.g. all:2d,daily:2w,weekly:3m,monthly:1y)')


@dataclasses.dataclass(frozen=True)
class KeepRule:
    """Keep every snapshot (period `all`), or the oldest one of each hour, day,
    ISO week, month or year (UTC), among those at most `max_age` old."""
    period: str
    max_age: int                    # seconds


def tool_snapshot_time(name: str, prefix: str) -> Optional[int]:
    """Seconds since the epoch from a name snapshot_name(prefix, ...) made;
    None for any other snapshot."""
    match = re.fullmatch(
        re.escape(prefix) + r'-([0-9]{4})([0-9]{2})([0-9]{2})T([0-9]{2})([0-9]{2})([0-9]{2})Z',
        name)
    if not match:
        return None
    fields = tuple(int(field) for field in match.groups())
    try:
        datetime.datetime(*fields)
    except ValueError:              # a 13th month, a 25th hour
        return None
    return calendar.timegm(fields)


def parse_keep_schedule(text: str) -> Tuple[KeepRule, ...]:
    """'all:2d,daily:2w' -> rules, finest period first."""
    if not text.strip():
        raise ValueError('empty keep schedule: give ' + KEEP_SCHEDULE_HELP)
    rules = {}
    for part in text.split(','):
        match = KEEP_RULE_PATTERN.fullmatch(part.strip())
        if not match:
            raise ValueError('bad keep rule {!r}: {}'.format(part.strip(), KEEP_SCHEDULE_HELP))
        period, count, unit = match.groups()
        if period in rules:
            raise ValueError('keep rule {!r} repeats period {}: one rule per PERIOD'.format(
                part.strip(), period))
        rules[period] = KeepRule(period, int(count) * AGE_UNITS[unit])
    return tuple(rules[period] for period in KEEP_PERIODS if period in rules)


def format_keep_schedule(rules: Sequence[KeepRule]) -> str:
    return ','.join('{}:{}'.format(rule.period, _format_age(rule.max_age)) for rule in rules)


def _format_age(seconds):
    for unit, size in AGE_UNITS.items():     # largest unit first
        if seconds % size == 0:
            return '{}{}'.format(seconds // size, unit)
    return '{}h'.format(seconds // 3600)


def thin_snapshots(snapshots: Sequence[Snapshot], rules: Sequence[KeepRule], now: int,
                   prefix: str, protect: Collection[int] = (),
                   foreign: bool = False) -> List[Snapshot]:
    """The backup's snapshots to destroy, oldest first: those no rule keeps,
    each aged as retention_ages says.

    Never the newest, a protected one (by guid), one a clone depends on (a
    mounted restore point), a bookmark, or one retention_ages does not count;
    others' snapshots only with `foreign`. Because a period rule keeps the
    oldest snapshot of each bucket, thinning the survivors again at the same
    `now` destroys nothing."""
    snaps = [s for s in snapshots if not s.bookmark]
    if not snaps:
        return []
    newest = max(snaps, key=lambda s: s.createtxg)
    times, _ = retention_ages(snaps, prefix, foreign)
    kept = _kept_by_rules(times, rules, now)
    doomed = [s for s in times if s not in kept and s != newest and s.guid not in protect
              and not s.cloned]
    return sorted(doomed, key=lambda s: s.createtxg)


def retention_ages(snapshots: Sequence[Snapshot], prefix: str, foreign: bool = False
                   ) -> Tuple[Dict[Snapshot, int], Dict[Snapshot, str]]:
    """(the time by which retention ages each snapshot it counts; why it
    counts none of the others that it would: each is kept, and reported).

    A backup is aged by its receipt (RECEIVED), which this host wrote: never
    by a name or a creation time, which the node chose. One without a receipt
    that came before the first with one was received before receipts were
    written, and is aged as it was then: by its name's time, or (another
    tool's, with `foreign`) its creation. One without a receipt after that is
    not counted; nor one whose name's time is not when it was made (a name
    that a node made up). Snapshots of other tools, without `foreign`, are
    neither counted nor reported."""
    snaps = [s for s in snapshots if not s.bookmark]
    recorded = [s.createtxg for s in snaps if s.received is not None]
    receipts_since = min(recorded, default=None)
    times, doubtful = {}, {}
    for snap in snaps:
        named = tool_snapshot_time(snap.name, prefix)
        if named is None and not foreign:
            continue
        if named is not None and abs(named - snap.creation) > NAME_TIME_SLACK:
            doubtful[snap] = 'its name says {}, but it was made {}'.format(
                _utc(named), _utc(snap.creation))
        elif snap.received is not None:
            times[snap] = snap.received
        elif receipts_since is None or snap.createtxg < receipts_since:
            times[snap] = snap.creation if named is None else named
        else:
            doubtful[snap] = 'it has no receipt ({})'.format(RECEIVED)
    return times, doubtful


def _utc(when: int) -> str:
    return time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(when))


def _kept_by_rules(times: Dict[Snapshot, int], rules, now) -> Set[Snapshot]:
    kept = {s for s, when in times.items() if when > now}
    for rule in rules:
        young = [s for s, when in times.items() if now - when <= rule.max_age]
        if rule.period == 'all':
            kept.update(young)
            continue
        oldest_per_bucket = {}
        for snap in sorted(young, key=lambda s: (times[s], s.createtxg)):
            oldest_per_bucket.setdefault(_bucket(rule.period, times[snap]), snap)
        kept.update(oldest_per_bucket.values())
    return kept


# Which fields of a UTC struct_time name a period's bucket (weekly: ISO week).
_BUCKET_FIELDS = {'yearly': 1, 'monthly': 2, 'daily': 3, 'hourly': 4}


def _bucket(period, when):
    utc = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    if period == 'weekly':
        return utc.isocalendar()[:2]
    return utc.timetuple()[:_BUCKET_FIELDS[period]]


def prune_source(snapshots: Sequence[Snapshot], keep: int, prefix: str,
                 protect: Collection[int] = (), owner: Optional[str] = None) -> List[Snapshot]:
    """The tool's own snapshots to destroy on the source, oldest first: all but
    the newest `keep`, and never a protected one (by guid) or one a clone
    depends on. With `owner`, its own are those marked with it
    (OWNER_PROPERTY), not those its names say."""
    if keep < 1:
        raise ValueError('keep at least 1 snapshot on the source, not {}'.format(keep))
    own = sorted((s for s in snapshots if _is_own(s, prefix, owner)),
                 key=lambda s: s.createtxg)
    return [s for s in own[:-keep] if s.guid not in protect and not s.cloned]


def bookmark_changes(src: Dataset, base: Optional[int], prefix: str,
                     owner: Optional[str] = None) -> Tuple[Optional[Snapshot], List[Snapshot]]:
    """(the snapshot `base` to bookmark, or None when it has a bookmark
    already; the tool's other bookmarks, to destroy). Nothing without a base."""
    if base is None:
        return None, []
    marks = [s for s in src.snapshots if s.bookmark]
    snapshot = next((s for s in src.snapshots if not s.bookmark and s.guid == base), None)
    if any(m.guid == base for m in marks):
        snapshot = None
    elif snapshot is None:      # neither: keep every bookmark, one may be the base
        return None, []
    return snapshot, [m for m in _own_marks(src, prefix, owner) if m.guid != base]


def _is_own(snap, prefix, owner=None):
    if snap.bookmark or TRANSIENT_SNAPSHOT.fullmatch(snap.name):
        return False
    if owner is not None:
        return snap.owner == owner
    return tool_snapshot_time(snap.name, prefix) is not None


def _own_marks(src, prefix, owner):
    """The tool's bookmarks on `src`. A bookmark holds no user property, so
    with an owner it is the tool's when it marks one of the tool's snapshots."""
    marks = [s for s in src.snapshots if s.bookmark]
    if owner is None:
        return [m for m in marks if tool_snapshot_time(m.name, prefix) is not None]
    own = {s.guid for s in src.snapshots if _is_own(s, prefix, owner)}
    return [m for m in marks if m.guid in own]


# ==============================================================================
# The transfer pipeline (pure: argv lists in, argv lists out)
# ==============================================================================

COMPRESSORS = {
    # name: (compress on the source, decompress here)
    'zstd': (['zstd', '-3', '-T0', '-q', '-c'], ['zstd', '-d', '-q', '-c']),
    'lz4': (['lz4', '-q', '-c'], ['lz4', '-d', '-q', '-c']),
    'gzip': (['gzip', '-3', '-c'], ['gzip', '-d', '-c']),
    'qlzip1': (['qlzip1'], ['qlzcat1']),
    'none': None,
}
@dataclasses.dataclass(frozen=True)
class TransferOptions:
    compress: str = 'zstd'
    mbuffer: Optional[str] = None   # buffer size, e.g. '256M'
    progress: bool = False          # pv, to stderr
    bwlimit: Optional[str] = None   # bytes per second, e.g. '20M' (pv -L)


# What pv -L takes (a whole number of bytes with K, M, G or T for powers of
# 1024; 0 would mean no limit) and mbuffer -m (the same up to G, or a share
# of the memory).
PV_RATE = re.compile(r'[1-9][0-9]*[kKmMgGtT]?')
MBUFFER_SIZE = re.compile(r'[1-9][0-9]*[kKmMgG]?|[1-9][0-9]?%')


def parse_bwlimit(text: str) -> str:
    if not PV_RATE.fullmatch(text):
        raise ValueError('{!r} is no rate; give bytes per second as a whole number, '
                         'with K, M, G or T for powers of 1024: e.g. 50M'.format(text))
    return text


def parse_mbuffer_size(text: str) -> str:
    if not MBUFFER_SIZE.fullmatch(text):
        raise ValueError('{!r} is no buffer size; give a whole number of bytes, with K, M '
                         'or G for powers of 1024 (e.g. 256M), or a share of the memory '
                         '(e.g. 5%)'.format(text))
    return text


# What a receive on the backup host sets, by the type the source's listing
# announced: a filesystem never mounts (canmount=noauto; and a volume's
# stream is refused, as canmount does not apply to it); nothing on it could
# run if it did; a volume's partitions stay hidden from this host (no
# partition table, LVM or file system of a guest is read here).
RECEIVE_OVERRIDES = {
    'filesystem': {'canmount': 'noauto', 'setuid': 'off', 'exec': 'off', 'devices': 'off'},
    'volume': {'volmode': 'dev'},
}
# What it takes from no stream (recv -x: inherited from the backup root, or
# the default): where to mount and what to share, and reservations of space.
# A volume's too keep mountpoint: a filesystem's stream sent in its place
# then lands under the parent's mountpoint=none, and is destroyed at once.
RECEIVE_EXCLUDES = {
    'filesystem': ('mountpoint', 'sharenfs', 'sharesmb', 'reservation', 'refreservation'),
    'volume': ('mountpoint', 'reservation', 'refreservation'),
}


def transfer_commands(opts: TransferOptions, remote: bool) -> Tuple[list, list]:
    """The commands around zfs send and zfs recv, (sending side, receiving
    side): compression where the stream crosses ssh, mbuffer where it lands."""
    pair = COMPRESSORS[opts.compress] if remote else None
    send_side = [pair[0]] if pair else []
    recv_side = [pair[1]] if pair else []
    if opts.mbuffer:
        recv_side.append(['mbuffer', '-q', '-s', '128k', '-m', opts.mbuffer])
    return send_side, recv_side


def send_args(step, src: Dataset, raw: bool) -> List[str]:
    """The arguments of zfs send for one step; `raw` keeps an encrypted
    dataset's blocks encrypted (-w)."""
    if isinstance(step, ResumeStep):
        return ['send', '-t', step.token]
    # Large and compressed blocks as they are on disk; no -e: an encrypted
    # destination (tank/enc) cannot receive embedded blocks.
    flags = ['-w'] if raw else ['-L', '-c']
    if step.base is not None:
        flags += ['-I' if step.intermediates else '-i', src.name + step.base.ref]
    return ['send', *flags, src.name + step.snapshot.ref]


def recv_args(dst: str, props: Dict[str, str], mount: bool = False,
              excludes: Sequence[str] = ()) -> List[str]:
    """zfs recv: resumable (-s), setting `props`, taking none of `excludes`
    from the stream, and not mounted (-u) unless `mount`."""
    args = ['recv', '-s'] + ([] if mount else ['-u']) + ['-v']
    for key, value in sorted(props.items()):
        args += ['-o', '{}={}'.format(key, value)]
    for key in excludes:
        args += ['-x', key]
    return args + [dst]


def build_transfer(src_host, dst_host, send: List[str], recv: List[str],
                   opts: TransferOptions, label: str, estimate: int) -> List[Stage]:
    """zfs send on `src_host` piped into zfs recv on `dst_host`, one of them
    this machine: a pull (a backup) or a push (a restore). pv runs here,
    beside the local zfs, where the stream is not compressed."""
    send_side, recv_side = transfer_commands(
        opts, src_host.is_remote or dst_host.is_remote)
    sending = src_host.stages([src_host.zfs(*send)] + send_side)
    receiving = dst_host.stages(recv_side + [dst_host.zfs(*recv)])
    pv = [pv_stage(opts, label, estimate)] if opts.progress or opts.bwlimit else []
    if src_host.is_remote:
        return sending + receiving[:-1] + pv + receiving[-1:]
    return sending[:1] + pv + sending[1:] + receiving


def pv_stage(opts: TransferOptions, label: str, estimate: int) -> Stage:
    """pv shows progress (sized by the estimate) and/or limits the rate."""
    argv = ['pv'] + (['-ptebar', '-N', label] if opts.progress else ['-q'])
    if opts.progress and estimate:
        argv += ['-s', str(estimate)]
    if opts.bwlimit:
        argv += ['-L', opts.bwlimit]
    return Stage('pv', argv, show_stderr=opts.progress)


def transfer_programs(opts: TransferOptions, src_host, dst_host) -> List[Tuple[object, List[str]]]:
    """The programs besides zfs that each side of a transfer runs: [(host, names)]."""
    send_side, recv_side = transfer_commands(
        opts, src_host.is_remote or dst_host.is_remote)
    pv = ['pv'] if opts.progress or opts.bwlimit else []
    return [(src_host, [cmd[0] for cmd in send_side] + ([] if src_host.is_remote else pv)),
            (dst_host, [cmd[0] for cmd in recv_side] + (pv if src_host.is_remote else []))]


def pipeline_text(stages: Sequence[Stage]) -> str:
    """The pipeline as one line a user could paste into a shell."""
    return ' | '.join(shlex.join(stage.argv) for stage in stages)


# ==============================================================================
# The sync engine: list, snapshot, plan, transfer, then retention
# ==============================================================================

MAX_STEPS = 6       # resume, abort, rollback, full, incremental, and one spare
# How zfs recv refuses a stream of another type than the options it was
# given are for (RECEIVE_OVERRIDES), before anything of it lands.
NOT_ITS_TYPE = re.compile(r"^cannot receive.*: (property '[^']*' does not apply to datasets "
                          r"of this type)", re.M)
MISSING_DATASET = re.compile(r"cannot open '[^']*': dataset does not exist")


@dataclasses.dataclass(frozen=True)
class SyncJob:
    """One dataset to bring up to date: from `src` on `src_host` to `dst` on
    the run's destination host (here for a backup, a node for a restore)."""
    src_host: object                # LocalHost or SshHost
    src: str                        # the source dataset
    dst: str                        # the destination dataset
    group: str = ''                 # jobs of one group are snapshotted at once
    props: Tuple[Tuple[str, str], ...] = ()     # recorded on the destination
    snapshot_props: Tuple[Tuple[str, str], ...] = ()    # on each snapshot it brings
    until: Optional[str] = None     # the snapshot to sync to; None: the newest
    receive_props: Tuple[Tuple[str, str], ...] = ()     # ZFS properties, set on receive
    mount: bool = False             # mount a received filesystem
    raw: Optional[bool] = None      # send -w; None: when the source is encrypted


@dataclasses.dataclass(frozen=True)
class SyncOptions:
    transfer: TransferOptions = TransferOptions()
    snapshot_prefix: str = 'planb'
    snapshot_name: Optional[str] = None     # fixed (PlanB's); None: PREFIX-TIME of now
    owner: Optional[str] = None     # mark snapshots OWNER_PROPERTY=owner; prune only those
    make_snapshot: bool = True
    snapshot_reuse_age: int = 0     # seconds; 0: always make a fresh one
    intermediates: bool = True
    rollback: bool = False
    destroy_diverged: bool = False
    dry_run: bool = False
    wait: bool = False
    lock_dir: Optional[str] = None
    jobs: int = 1                   # transfers at once, in all
    jobs_per_node: int = 1          # transfers at once from one source host
    keep_source: Optional[int] = DEFAULT_KEEP_SOURCE    # None: keep them all
    keep_destination: Tuple = ()    # KeepRules; (): keep them all
    thin_foreign: bool = False      # thin snapshots the tool did not make too
    bookmarks: bool = True          # bookmark the base on the source, drop older ones


@dataclasses.dataclass
class JobResult:
    job: SyncJob
    status: str = 'planned'         # synced, up-to-date, failed, skipped, planned
    detail: str = ''
    sent: int = 0                   # bytes received, as zfs recv counts them
    seconds: float = 0.0
    started: float = 0.0            # wall clock, seconds since the epoch
    destroyed: Tuple[str, ...] = ()     # snapshots removed by retention


class SyncError(PvesyncError):
    """This volume cannot be synced; the others go on."""


class KeyNotLoaded(PvesyncError):
    """Where the backups go is encrypted and its key is not loaded: nothing
    can be received there, so the run stops before it snapshots anything."""
    exit_code = EXIT_CANNOT_START


class BadAnswer(PvesyncError):
    """A host answered what its zfs would not: nothing of it is used."""


def list_datasets(host, names: Sequence[str], depth=1, needs=()) -> Dict[str, Dataset]:
    """One zfs list for all of `names`; the ones that do not exist are left out.
    With `needs`, the same round trip checks for those programs (Host.run)."""
    if not names:
        return {}
    try:
        output = host.run(host.zfs(*zfs_list_args(names, depth)), needs)
    except CommandError as exc:
        lines = [line for line in exc.stderr.splitlines() if line.strip()]
        if not (lines and all(MISSING_DATASET.search(line) for line in lines)):
            raise
        output = exc.stdout
    try:
        return parse_zfs_list(output)
    except ValueError as exc:
        raise BadAnswer('{}: zfs list answered {}; nothing of its answer is used'.format(
            host.name, exc))


def read_receipts(host, parents: Sequence[str]) -> Dict[str, int]:
    """The receipts this host set on the snapshots of the children of
    `parents` (parse_receipts): one zfs get."""
    if not parents:
        return {}
    return parse_receipts(host.run(host.zfs(
        'get', '-H', '-p', '-s', 'local', '-o', 'name,value', '-t', 'snapshot', '-d', '2',
        RECEIVED, *parents)))


@dataclasses.dataclass(frozen=True)
class TokenSends:
    """What a partial receive's resume token sends, as `zfs send -n -v -P -t`
    reads it: the dataset it names and the guid of the snapshot (zfs send -t
    looks that up by guid, anywhere in the pool: the name is only a label),
    and the bytes still to send."""
    dataset: Optional[str]
    guid: Optional[int]
    remaining: int

    def is_of(self, dataset: Dataset) -> bool:
        """Whether it sends a snapshot of `dataset`, by name and by guid."""
        return self.dataset in (None, dataset.name) and self.guid in {
            s.guid for s in dataset.snapshots if not s.bookmark}


def read_resume_token(host, token: str) -> Optional[TokenSends]:
    """What `token` sends, as `host` reads it; None when the host cannot send
    it (its snapshot is gone there)."""
    try:
        out = host.run(host.zfs('send', '-n', '-v', '-P', '-t', token))
    except CommandError as exc:
        log.info('%s: resume token unusable: %s', host.name, exc)
        return None
    named = re.search(r'^\s*toname = ([^@\n]*)@', out, re.M)
    guid = re.search(r'^\s*toguid = (0x[0-9a-f]+|[0-9]+)$', out, re.M)
    sizes = re.findall(r'^(?:size|full|incremental)\t.*?(\d+)$', out, re.M)
    return TokenSends(named.group(1) if named else None, int(guid.group(1), 0) if guid else None,
                      int(sizes[-1]) if sizes else 0)


def _ancestors(dataset: str) -> List[str]:
    """'tank/enc/x' -> ['tank/enc', 'tank']: the nearest first."""
    parts = dataset.split('/')
    return ['/'.join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def snapshot_name(prefix: str, now: float) -> str:
    return '{}-{}'.format(prefix, time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now)))


# Of the characters ZFS allows in a snapshot name, those that keep the tool's
# own names one word in a shell, a cron line or a PlanB setting.
SNAPSHOT_PREFIX = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}')


def parse_snapshot_prefix(text: str) -> str:
    if not SNAPSHOT_PREFIX.fullmatch(text):
        raise ValueError('{!r} is no snapshot prefix; use up to 64 letters, digits and '
                         '_ . : - (no space), starting with a letter or a digit: e.g. '
                         'nightly'.format(text))
    return text


def needs_snapshot(sources: Sequence[Dataset], reuse_age: int, now: float) -> bool:
    """False when every source has a snapshot younger than `reuse_age`."""
    def young(dataset):
        snaps = [s for s in syncable_snapshots(dataset) if not s.bookmark]
        return bool(snaps) and now - snaps[-1].creation < reuse_age
    return not (reuse_age > 0 and all(young(d) for d in sources))


class DatasetLock:
    """An flock per destination dataset, so that overlapping runs never
    receive into the same dataset at once. The stages of the dataset's
    commands inherit it (RUNNING.holding): a run killed mid-transfer leaves
    it held until the last of them has ended."""

    def __init__(self, lock_dir: str, dataset: str):
        self.dataset = dataset
        self.path = os.path.join(lock_dir, dataset.replace('/', '%') + '.lock')
        self.fd = None

    def acquire(self, wait: bool) -> bool:
        """False when another run holds it (and not `wait`). The file is
        opened without following a symbolic link, and used only when it is
        a plain file of this user's with no other name."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LockError('{} is a symbolic link, which a lock never follows; '
                                'remove it'.format(self.path))
            raise LockError('{}: cannot open it: {}'.format(self.path, exc.strerror))
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid() \
                or found.st_nlink != 1:
            os.close(fd)
            raise LockError('{} is not a plain file of your own (a hard link, or '
                            "another user's); remove it".format(self.path))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, '{}\n'.format(os.getpid()).encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd) as fp:
                return 'pid ' + (fp.read(20).strip() or '?')
        except OSError:
            return 'another process'

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LockError(PvesyncError):
    """A lock file or its directory is not safe to use; nothing was done
    to the volumes it guards."""
    exit_code = EXIT_CANNOT_START


def lock_directory(wanted: Optional[str]) -> str:
    """Where the locks live: `wanted` (--lock-dir), else this user's own
    /run/lock/planb-pvesync-UID (in the temporary directory where there is
    no /run/lock), made with mode 0700. Only a directory of this user's that
    no one else may enter is used: another user could plant a link in it."""
    uid = os.geteuid()
    if wanted:
        candidates = [os.path.abspath(wanted)]
    else:
        candidates = [os.path.join(base, 'planb-pvesync-{}'.format(uid))
                      for base in ('/run/lock', tempfile.gettempdir()) if os.path.isdir(base)]
    for path in candidates:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            if wanted:
                raise LockError('--lock-dir {}: cannot make it: {}'.format(path, exc.strerror))
            continue
        found = os.lstat(path)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != uid:
            raise LockError('{} is not a directory of your own (uid {}), so it cannot hold '
                            'the locks; remove it, or name another with --lock-dir'.format(
                                path, uid))
        if found.st_mode & 0o077:
            raise LockError('{} may be used by others (mode {:o}), so it cannot hold the '
                            'locks; chmod 700 {}'.format(
                                path, stat.S_IMODE(found.st_mode), shlex.quote(path)))
        return path
    raise LockError('no directory for the locks: /run/lock and {} are not writable; '
                    'name one with --lock-dir'.format(tempfile.gettempdir()))


# What the tool does with zfs on the backup host, as OpenZFS delegates it:
# `zfs allow -u USER PERMISSIONS ROOT` on the backup root, whose mountpoint
# is none, lets USER run the sync and restores without sudo. Not among them:
# mountpoint, setuid, exec, devices, share (so neither the user nor a stream
# can set those below the root: all inherit the root's) and snapshot, clone,
# promote, allow, load-key.
BACKUP_PERMISSIONS = ('create', 'destroy', 'mount', 'receive', 'rollback', 'rename', 'send',
                      'userprop', 'canmount', 'volmode')


def delegated_permissions(allow_text: str, user: str, groups: Collection[str]) -> Set[str]:
    """What `zfs allow DATASET` says `user` (by name, by one of its `groups`,
    or as everyone) may do below DATASET: the Descendent and Local+Descendent
    permissions of DATASET and of its ancestors. Permission sets (@NAME) are
    not looked into."""
    held, applies = set(), False
    for line in allow_text.splitlines():
        words = line.split()
        if not line[:1].isspace():
            applies = line.strip() in ('Descendent permissions:',
                                       'Local+Descendent permissions:')
        elif applies and len(words) >= 2 and (
                words[0] == 'everyone' or words[:2] == ['user', user]
                or (words[0] == 'group' and words[1] in groups)):
            held.update(words[-1].split(','))
    return held


def backup_host(dataset: str) -> LocalHost:
    """This host, as the tool works on `dataset` (the backup root, or a
    dataset below it): without sudo when this user holds every one of
    BACKUP_PERMISSIONS there by delegation, on a root that is not mounted
    (mountpoint=none, where the user cannot set another); else with sudo, as
    LocalHost() (a warning says why, when it holds some of them)."""
    here = LocalHost()
    if not here.sudo:
        return here
    bare = LocalHost(may_set=())       # reads need no privilege
    for name in [dataset, *_ancestors(dataset)]:
        try:
            allowed = bare.run(['zfs', 'allow', name])
            break
        except CommandError:        # it does not exist (yet): its parent decides
            continue
    else:
        return here
    user = pwd.getpwuid(os.geteuid()).pw_name
    held = delegated_permissions(allowed, user, _group_names())
    if not held:
        return here
    missing = [p for p in BACKUP_PERMISSIONS if p not in held]
    mountpoint = bare.run(['zfs', 'get', '-H', '-o', 'value', 'mountpoint', name]).strip()
    if missing or mountpoint != 'none':
        log.warning('%s holds zfs permissions on %s by delegation, but %s; so zfs runs with '
                    'sudo (README.rst: Security)', user, name,
                    'not ' + ','.join(missing) if missing else
                    'its mountpoint is {}, not none'.format(mountpoint))
        return here
    return LocalHost(may_set=held)


def _group_names() -> Set[str]:
    names = set()
    for gid in {os.getegid(), *os.getgroups()}:
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(gid).gr_name)
    return names


class SyncRun:
    """One run over many jobs: lists each host once (all side by side),
    snapshots each group at once, then syncs job after job; a failing job
    does not stop the others."""

    def __init__(self, jobs: Sequence[SyncJob], dst_host, opts: SyncOptions,
                 freeze=None, out=print):
        self.jobs = list(jobs)
        self.dst_host = dst_host
        self.opts = opts
        self.freeze = freeze        # group -> context manager around its snapshot
        self.out = out
        self.results = {job.dst: JobResult(job) for job in self.jobs}
        self.src = {}               # (host name, dataset) -> Dataset
        self.dst = {}               # dataset -> Dataset
        self.upkeep = {}            # dataset -> (source commands, [Snapshot] they destroy)
        self.missing = {}           # host name -> programs a transfer needs that it lacks
        self.locks = {}             # dataset -> its DatasetLock, while the run holds it
        self._mutex = threading.Lock()  # for self.dst

    def run(self) -> List[JobResult]:
        locks = self._lock_all()
        self.locks = {lock.dataset: lock for lock in locks}
        try:
            active = [j for j in self.jobs if self.results[j.dst].status == 'planned']
            side_by_side(lambda read: read(active), (self._read_sources, self._read_destinations))
            self._check_programs(self._ready(active))
            self._take_snapshots(self._ready(active))
            self._sync_all(self._ready(active))
            self._upkeep_sources()
        finally:
            for lock in locks:
                lock.release()
        return [self.results[job.dst] for job in self.jobs]

    def _ready(self, jobs):
        return [j for j in jobs if self.results[j.dst].status == 'planned']

    def _fail(self, job, message, status='failed'):
        result = self.results[job.dst]
        result.status, result.detail = status, message

    def _lock_all(self):
        if self.opts.dry_run:
            return []
        lock_dir = lock_directory(self.opts.lock_dir)
        locks = []
        for job in self.jobs:
            lock = DatasetLock(lock_dir, job.dst)
            try:
                acquired = lock.acquire(self.opts.wait)
            except LockError as exc:
                self._fail(job, str(exc))
                continue
            if acquired:
                locks.append(lock)
            else:
                self._fail(job, '{} is syncing it now; skipped (--wait waits '
                                'for it)'.format(lock.holder()), 'skipped')
        return locks

    def _read_sources(self, jobs):
        each_host(jobs, self._read_host)

    def _read_host(self, host, jobs):
        try:
            found = list_datasets(host, sorted({j.src for j in jobs}),
                                  needs=self._programs(host, jobs))
        except MissingPrograms as exc:
            self.missing[host.name] = exc.names
            return
        except (CommandError, BadAnswer) as exc:
            for job in jobs:
                self._fail(job, 'cannot list its source: {}'.format(exc))
            return
        for job in jobs:
            if job.src not in found:
                self._fail(job, 'source {} does not exist on {}'.format(job.src, host.name))
            elif job.until and not any(s.name == job.until for s in found[job.src].snapshots):
                self._fail(job, 'source {} has no snapshot @{}'.format(job.src, job.until))
            else:
                self.src[(host.name, job.src)] = up_to(found[job.src], job.until)

    def _read_destinations(self, jobs):
        parents = sorted({j.dst.rpartition('/')[0] for j in jobs})
        try:
            self.dst = list_datasets(self.dst_host, parents, depth=2,
                                     needs=self._programs(self.dst_host, jobs))
            self._check_keys(parents)
            if self._needs_receipts():
                receipts = read_receipts(self.dst_host, [p for p in parents if p in self.dst])
                self.dst = {name: with_receipts(d, receipts) for name, d in self.dst.items()}
        except MissingPrograms as exc:
            self.missing[self.dst_host.name] = exc.names
        except (CommandError, BadAnswer) as exc:
            for job in jobs:
                self._fail(job, 'cannot list the destination: {}'.format(exc))

    def _needs_receipts(self) -> bool:
        """Whether this run ages backups, or may destroy some by a flag."""
        opts = self.opts
        return not self.dst_host.is_remote and bool(
            opts.keep_destination or opts.rollback or opts.destroy_diverged)

    def _check_keys(self, parents):
        """Stop the run when the dataset that receives a backup (its parent,
        or the nearest ancestor that exists) has no key loaded, as after a
        reboot of this host. Ancestors are listed only for new parents."""
        ancestors = sorted({a for p in parents if p not in self.dst
                            for a in _ancestors(p)} - set(self.dst))
        found = {**list_datasets(self.dst_host, ancestors, depth=0), **self.dst}
        locked = []
        for parent in parents:
            nearest = next((found[name] for name in [parent, *_ancestors(parent)]
                            if name in found), None)
            if nearest and not nearest.key_loaded and nearest.encryption_root not in locked:
                locked.append(nearest.encryption_root)
        if locked:
            raise KeyNotLoaded(
                '{}: encryption key not loaded (was this host restarted?), so no backup '
                'can be received there; nothing was done; load it: {}'.format(
                    ', '.join(locked), '; '.join('zfs load-key ' + root for root in locked)))

    def _take_snapshots(self, jobs):
        """One zfs snapshot per source pool for every group that needs one:
        atomic within a pool, and a fixed number of commands per host. With
        --fsfreeze each group gets its own, inside its freeze. When a shared
        one fails (nothing was made: it is atomic), each group tries alone,
        so one vanished dataset fails only its own guest."""
        if not self.opts.make_snapshot:
            return
        now = time.time()
        name = self.opts.snapshot_name or snapshot_name(self.opts.snapshot_prefix, now)
        each_host(jobs, lambda host, host_jobs: self._snapshot_host(
            host_jobs, name, now))

    def _snapshot_host(self, jobs, name, now):
        groups = {}
        for job in jobs:
            if self._has_snapshot(job, name):
                log.info('%s: @%s exists already (an earlier run made it); '
                         'sending that one', job.src, name)
                continue
            groups.setdefault(job.group or job.src, []).append(job)
        due = {group: group_jobs for group, group_jobs in groups.items()
               if needs_snapshot([self.src[(j.src_host.name, j.src)] for j in group_jobs],
                                 self.opts.snapshot_reuse_age, now)}
        if self.freeze:
            for group, group_jobs in due.items():
                self._snapshot_frozen(group, group_jobs, name, now)
            return
        for shared in by_pool(job for group_jobs in due.values() for job in group_jobs):
            if not self._snapshot(shared, name, now, fail=False):
                for group_jobs in due.values():
                    alone = [job for job in group_jobs if job in shared]
                    if alone:
                        self._snapshot(alone, name, now)

    def _has_snapshot(self, job, name) -> bool:
        return any(s.name == name and not s.bookmark
                   for s in self.src[(job.src_host.name, job.src)].snapshots)

    def _snapshot_frozen(self, group, jobs, name, now):
        try:
            with self.freeze(group):
                for part in by_pool(jobs):
                    self._snapshot(part, name, now)
        except PvesyncError as exc:
            for job in jobs:
                self._fail(job, 'cannot freeze its filesystems: {}'.format(exc))

    def _snapshot(self, jobs, name, now, fail=True) -> bool:
        """One zfs snapshot of `jobs`' sources (one host, one pool).

        The new snapshot joins the listing without a second zfs list: its guid
        matters only once it is on the destination, which is listed anew.
        """
        host = jobs[0].src_host
        owner = self.opts.owner
        mark = ['-o', '{}={}'.format(OWNER_PROPERTY, owner)] if owner else []
        cmd = host.zfs('snapshot', *mark, *sorted('{}@{}'.format(j.src, name) for j in jobs))
        try:
            if self.opts.dry_run:
                self.out('would run on {}: {}'.format(host.name, shlex.join(cmd)))
            else:
                host.run(cmd)
        except PvesyncError as exc:
            for job in jobs if fail else ():
                self._fail(job, 'cannot snapshot: {}'.format(exc))
            return False
        log.info('%s: snapshot @%s of %d dataset(s)', host.name, name, len(jobs))
        for job in jobs:
            key = (host.name, job.src)
            newest = Snapshot(name, guid=0, createtxg=2 ** 63, creation=int(now),
                              owner=self.opts.owner)
            self.src[key] = dataclasses.replace(
                self.src[key], snapshots=self.src[key].snapshots + (newest,))
        return True

    def _programs(self, host, jobs) -> List[str]:
        """The programs besides zfs that `host` runs in the transfers of `jobs`."""
        return sorted({name for job in jobs
                       for side, names in transfer_programs(self.opts.transfer, job.src_host,
                                                            self.dst_host)
                       if side.name == host.name for name in names})

    def _check_programs(self, jobs):
        """Each host has the programs its side of the transfers runs, as the
        listings found (they asked in the same round trip)."""
        for job in jobs:
            reasons = ['{} on {}'.format(name, host.name)
                       for host in (job.src_host, self.dst_host)
                       for name in self.missing.get(host.name, ())]
            if reasons:
                self._fail(job, 'not installed: {}; install it or choose another '
                                '--compress'.format(', '.join(reasons)))

    def _sync_all(self, jobs):
        """Job after job, or with --jobs in lanes side by side: a lane is a
        share of one source host's jobs, so no host sends more at once than
        --jobs-per-node allows."""
        lanes = transfer_lanes(jobs, self.opts.jobs_per_node)
        if self.opts.dry_run or self.opts.jobs < 2 or len(lanes) < 2:
            for job in jobs:
                self._sync_job(job)
            return
        with ThreadPoolExecutor(max_workers=self.opts.jobs) as pool:
            for _ in pool.map(lambda lane: [self._sync_job(j) for j in lane], lanes):
                pass

    def _sync_job(self, job):
        lock = self.locks.get(job.dst)
        with RUNNING.holding([lock.fd] if lock else []):
            self._sync_locked_job(job)

    def _sync_locked_job(self, job):
        result = self.results[job.dst]
        src = self.src[(job.src_host.name, job.src)]
        dst = self.dst.get(job.dst)
        before = dst
        started = time.monotonic()
        result.started = time.time()
        log.info('%s: starting from %s:%s', job.dst, job.src_host.name, job.src)
        done = []
        try:
            if self.opts.dry_run:
                return self._show_plan(job, src, dst)
            if dst is not None and dst.type != src.type and not self.dst_host.is_remote:
                raise SyncError('it is a {}, but its source is a {}; nothing was sent: '
                                'rename or remove it'.format(dst.type, src.type))
            for _ in range(MAX_STEPS):
                plan = self._plan(src, dst)
                if plan.action == 'diverged':
                    raise SyncError(plan.problem)
                if not plan.steps:
                    break
                earlier = dst
                done.append(self._run_step(job, src, dst, plan.steps[0], result))
                dst = list_datasets(self.dst_host, [job.dst]).get(job.dst)
                if not self.dst_host.is_remote:
                    dst = self._check_received(job, src, earlier, dst)
                src = learn_guids(src, dst)
            else:
                raise SyncError('still not in sync after {} steps'.format(MAX_STEPS))
        except PvesyncError as exc:
            result.status, result.detail = 'failed', ', '.join(done + [str(exc)])
        else:
            result.status = 'synced' if done else 'up-to-date'
            newest = [s for s in dst.snapshots if not s.bookmark][-1]
            result.detail = ', '.join(done or ['at @' + newest.name])
            try:
                result.detail += ''.join(
                    ', ' + note for note in self._record_origin(job, before, dst))
                if done and job.snapshot_props:
                    self._record_with_snapshot(job, newest)
                self._apply_retention(job, src, dst, result)
            except CommandError as exc:     # the backup itself is fine
                log.warning('%s: after the sync: %s', job.dst, exc)
        result.seconds = time.monotonic() - started
        log.info('%s: %s', job.dst, result.status)

    def _check_received(self, job, src, earlier, dst) -> Optional[Dataset]:
        """What a receive here brought, checked and recorded: a dataset of
        another type than the source's listing said is undone (destroyed, or
        rolled back to where it was) and fails the volume; each new snapshot
        gets its receipt (RECEIVED, RECEIVED_FROM). Returns `dst` as it is now."""
        if dst is None:
            return None
        if dst.type != src.type:
            self._undo_receive(job, earlier)
            raise SyncError('{} sent a {} for {}, which its listing says is a {}; it was undone '
                            'here'.format(job.src_host.name, dst.type, job.src, src.type))
        receipts = {dst.name + s.ref: s.received for s in (earlier.snapshots if earlier else ())
                    if s.received is not None}
        known = {s.guid for s in (earlier.snapshots if earlier else ())}
        new = [s for s in dst.snapshots if not s.bookmark and s.guid not in known]
        if new:
            now = int(time.time())
            self.dst_host.run(self.dst_host.zfs(
                'set', '{}={}'.format(RECEIVED, time.strftime(RECEIPT_TIME, time.gmtime(now))),
                '{}={}'.format(RECEIVED_FROM, dict(job.props).get('node') or job.src_host.name),
                *(dst.name + s.ref for s in new)))
            receipts.update((dst.name + s.ref, now) for s in new)
        return with_receipts(dst, receipts)

    def _undo_receive(self, job, earlier):
        newest = [s for s in (earlier.snapshots if earlier else ()) if not s.bookmark][-1:]
        if newest:
            self.dst_host.run(self.dst_host.zfs('rollback', '-r', job.dst + newest[0].ref))
        else:
            self.dst_host.run(self.dst_host.zfs('destroy', '-r', job.dst))

    def _record_origin(self, job, before, dst) -> List[str]:
        """Bring the recorded origin up to date (a receive sets it, but an
        up-to-date volume sees none); says what changed, e.g. a migration."""
        stale = {key: value for key, value in job.props if dst.recorded.get(key) != value}
        if stale:
            self.dst_host.run(self.dst_host.zfs('set', *(
                '{}{}={}'.format(PROPERTY_PREFIX, k, v) for k, v in sorted(stale.items())),
                job.dst))
        old = before.recorded if before else {}
        return ['{} was {}, now {}'.format(key, old[key], value)
                for key, value in job.props
                if key in ('node', 'storage') and old.get(key, value) != value]

    def _record_with_snapshot(self, job, snapshot):
        """What belongs with the snapshot a sync brought (a guest's config),
        set on it: it lives and goes exactly as long as the snapshot."""
        self.dst_host.run(self.dst_host.zfs('set', *(
            '{}{}={}'.format(PROPERTY_PREFIX, key, value)
            for key, value in job.snapshot_props), job.dst + snapshot.ref))

    def _source_upkeep(self, job, src, base) -> Tuple[List[List[str]], List[Snapshot]]:
        """The commands the source needs after a sync, and the snapshots they
        destroy: a bookmark of `base` (the guid of the next run's base), so
        that the chain survives its snapshot; the older bookmarks and the
        snapshots retention lets go."""
        host, opts = job.src_host, self.opts
        mark, old_marks = None, []
        if opts.bookmarks:
            mark, old_marks = bookmark_changes(src, base, opts.snapshot_prefix, opts.owner)
        doomed = []
        if opts.keep_source:
            doomed = prune_source(src.snapshots, opts.keep_source, opts.snapshot_prefix,
                                  protect={base}, owner=opts.owner)
        cmds = []
        if mark:
            cmds.append(host.zfs('bookmark', job.src + mark.ref,
                                 '{}#{}'.format(job.src, mark.name)))
        if doomed:
            cmds.append(host.zfs('destroy', snapshot_spec(job.src, doomed)))
        cmds += [host.zfs('destroy', job.src + old.ref) for old in old_marks]
        return cmds, doomed

    def _thinned(self, dst, base) -> List[Snapshot]:
        """The destination's snapshots its keep schedule lets go."""
        if not self.opts.keep_destination or dst is None:
            return []
        return thin_snapshots(dst.snapshots, self.opts.keep_destination, time.time(),
                              self.opts.snapshot_prefix, protect={base},
                              foreign=self.opts.thin_foreign)

    def _report_uncounted(self, dst):
        """Say which snapshots the keep schedule keeps without counting them."""
        if not self.opts.keep_destination:
            return
        _, doubtful = retention_ages(dst.snapshots, self.opts.snapshot_prefix,
                                     self.opts.thin_foreign)
        if doubtful:
            (snap, why), more = next(iter(doubtful.items())), len(doubtful) - 1
            log.warning('%s: %d snapshot(s) kept and not counted by --keep-destination, as '
                        'retention ages a backup only by the receipt this host wrote: @%s '
                        '(%s)%s; remove them by hand if they are no backups',
                        dst.name, len(doubtful), snap.name, why,
                        ' and {} more'.format(more) if more else '')

    def _apply_retention(self, job, src, dst, result):
        """Thin the destination now; queue the source's commands for one ssh
        per host at the end of the run."""
        base = newest_common_guid(src, dst)
        self._report_uncounted(dst)
        thinned = self._thinned(dst, base)
        if thinned:
            self.dst_host.run(self.dst_host.zfs('destroy', snapshot_spec(dst.name, thinned)))
            result.destroyed += tuple(dst.name + s.ref for s in thinned)
        cmds, doomed = self._source_upkeep(job, src, base)
        if cmds:
            self.upkeep[job.dst] = (cmds, doomed)

    def _upkeep_sources(self):
        """Bookmarks and retention on the sources: one ssh per host."""
        each_host([j for j in self.jobs if j.dst in self.upkeep], self._upkeep_host)

    def _upkeep_host(self, host, jobs):
        try:
            host.run_all([cmd for job in jobs for cmd in self.upkeep[job.dst][0]])
        except CommandError as exc:
            log.warning('%s: could not bookmark or remove all old snapshots: %s',
                        host.name, exc)
            return
        for job in jobs:
            self.results[job.dst].destroyed += tuple(
                '{}:{}{}'.format(host.name, job.src, s.ref) for s in self.upkeep[job.dst][1])

    def _plan(self, src, dst):
        return plan_sync(src, dst, intermediates=self.opts.intermediates,
                         rollback=self.opts.rollback,
                         destroy_diverged=self.opts.destroy_diverged)

    def _run_step(self, job, src, dst, step, result) -> str:
        """Carry out one step of a plan; returns what it did, for the summary."""
        if isinstance(step, RollbackStep):
            self._say_what_goes(job, dst, later_snapshots(dst, step.snapshot), '--rollback')
            self.dst_host.run(self._rollback_cmd(job, step))
            log.warning('%s: rolled back to @%s', dst.name, step.snapshot.name)
            return 'rolled back to @' + step.snapshot.name
        if step_is_full(step) and dst is not None:
            # Only with --destroy-diverged does a full stream meet an existing dataset.
            self._say_what_goes(job, dst, [s for s in dst.snapshots if not s.bookmark],
                                '--destroy-diverged')
            self.dst_host.run(self.dst_host.zfs('destroy', '-r', dst.name))
            log.warning('%s: destroyed (it shared no snapshot with %s)', dst.name, src.name)
        if isinstance(step, ResumeStep):
            estimate = self._resume_estimate(job, step)
            if estimate is None:
                self.dst_host.run(self.dst_host.zfs('recv', '-A', job.dst))
                log.warning('%s: aborted a resumable receive whose source snapshot '
                            'is gone', job.dst)
                return 'aborted a stale partial receive'
        else:
            estimate = step.estimate
        if step_is_full(step):
            self._create_parent(job.dst)
        stages = self._transfer_stages(job, src, step, estimate)
        try:
            output = run_pipeline(stages, capture=True)
        except CommandError as exc:
            refused = NOT_ITS_TYPE.search(exc.stderr)
            if refused and not self.dst_host.is_remote:
                raise SyncError('{} sent a stream that is no {}, though its listing says {} is '
                                'one: zfs recv refused it ({}), and nothing of it was kept'.format(
                                    job.src_host.name, src.type, job.src, refused.group(1)))
            raise
        result.sent += received_bytes(output)
        return describe_step(step)

    def _say_what_goes(self, job, dst, snapshots, flag):
        """Before --rollback or --destroy-diverged destroys backups that came
        from the node (it no longer has them, or their base), say so: a node
        that deletes its own snapshots must not erase its history here unseen."""
        received = [s for s in snapshots if s.received is not None
                    or tool_snapshot_time(s.name, self.opts.snapshot_prefix) is not None]
        if received:
            log.warning('%s: %s destroys %d backup(s) that %s sent here and no longer shares '
                        'with it (%s): a node that deleted its own snapshots erases their '
                        'history here with this flag; run it by hand, never from cron',
                        dst.name, flag, len(received), job.src_host.name,
                        ', '.join('@' + s.name for s in received[:5])
                        + (' ...' if len(received) > 5 else ''))

    def _rollback_cmd(self, job, step):
        return self.dst_host.zfs('rollback', '-r', job.dst + step.snapshot.ref)

    def _transfer_stages(self, job, src, step, estimate):
        here = not self.dst_host.is_remote
        props, excludes = {}, []
        if here or not isinstance(step, ResumeStep):
            props, excludes = receive_options(job, src, here, self.dst_host.may_set)
        raw = src.encrypted if job.raw is None else job.raw
        return build_transfer(job.src_host, self.dst_host, send_args(step, src, raw),
                              recv_args(job.dst, props, job.mount, excludes),
                              self.opts.transfer, job.dst, estimate)

    def _resume_estimate(self, job, step) -> Optional[int]:
        """Bytes still to send for a resume token; None when the token is stale.
        A token is resumed only for the source it came from: it names what the
        source sends, and a destination is no authority on that."""
        sends = read_resume_token(job.src_host, step.token)
        if sends is None:
            return None
        if not sends.is_of(self.src[(job.src_host.name, job.src)]):
            other = sends.dataset or 'another dataset'
            raise SyncError(
                'it holds a partial receive of {0}, not of its source {1}, so it is not '
                'resumed (that would send {0}); if {1} is right, abort it: zfs recv -A '
                '{2}'.format(other, job.src, job.dst))
        return sends.remaining

    def _create_parent(self, dst):
        """A parent that never mounts: mountpoint=none; by delegation, which
        does not grant setting a mountpoint, the backup root's none inherited
        and canmount=off (zfs create would try to mount it)."""
        parent = dst.rpartition('/')[0]
        unmounted = 'canmount=off' if self.dst_host.may_set is not None else 'mountpoint=none'
        with self._mutex:
            if parent not in self.dst:
                self.dst_host.run(self.dst_host.zfs('create', '-o', unmounted, parent))
                self.dst[parent] = Dataset(parent, 'filesystem')

    def _show_plan(self, job, src, dst):
        plan = self._plan(src, dst)
        result = self.results[job.dst]
        result.detail = plan.problem or plan.action
        self.out('{}: {}'.format(job.dst, plan.problem or plan.action))
        for step in plan.steps:
            if isinstance(step, RollbackStep):
                self.out('  ' + shlex.join(self._rollback_cmd(job, step)))
            else:
                self.out('  ' + pipeline_text(self._transfer_stages(
                    job, src, step, getattr(step, 'estimate', 0))))
        if plan.action == 'resume':
            self.out('  (then plan again from what the resumed stream brings)')
        if plan.action == 'diverged':
            return
        # As if the plan succeeded: the source's newest becomes the base.
        base = [s for s in syncable_snapshots(src) if not s.bookmark][-1].guid
        for cmd in self._source_upkeep(job, src, base)[0]:
            self.out('  then on {}: {}'.format(job.src_host.name, shlex.join(cmd)))
        thinned = self._thinned(dst, base)
        if thinned:
            self.out('  then here: ' + shlex.join(
                self.dst_host.zfs('destroy', snapshot_spec(job.dst, thinned))))


def side_by_side(work, items) -> list:
    """[work(item) for item in items], all at once: their round trips overlap
    instead of adding up."""
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(work, items))


def each_host(jobs: Iterable[SyncJob], work):
    """work(host, its jobs) for every source host at once."""
    hosts = {}
    for job in jobs:
        hosts.setdefault(job.src_host.name, (job.src_host, []))[1].append(job)
    side_by_side(lambda item: work(*item), hosts.values())


def by_pool(jobs: Iterable[SyncJob]) -> List[List[SyncJob]]:
    """`jobs` in groups of one source host and pool: what one zfs snapshot
    can cover (it is atomic, and refuses datasets of two pools)."""
    groups = {}
    for job in jobs:
        groups.setdefault((job.src_host.name, job.src.split('/')[0]), []).append(job)
    return list(groups.values())


def transfer_lanes(jobs: Sequence[SyncJob], per_node: int) -> List[List[SyncJob]]:
    """`jobs` dealt into lanes of one source host each, `per_node` lanes per
    host, the first lane of every host first: the lanes run side by side."""
    by_host = {}
    for job in jobs:
        lanes = by_host.setdefault(job.src_host.name, [[] for _ in range(per_node)])
        lanes[sum(map(len, lanes)) % per_node].append(job)
    return [lane for rank in range(per_node) for lanes in by_host.values()
            for lane in lanes[rank:rank + 1] if lane]


def receive_options(job: SyncJob, src: Dataset, here: bool,
                    may_set: Optional[Collection[str]] = None) -> Tuple[Dict[str, str], List[str]]:
    """(the properties a receive sets, those it takes from no stream): the
    job's own and the recorded origin. Received here, from a node, no stream
    sets what could mount, share or run from a backup, or take space from the
    others, nor the origin records the tool trusts: RECEIVE_OVERRIDES and
    RECEIVE_EXCLUDES for the type the source's listing announced (those for a
    filesystem refuse a volume's stream before it lands), and -x of the
    origin records not set here. `may_set`: what this host's user may set,
    where it works by delegation: a stream cannot set the rest either, which
    inherit the backup root's (an -o or -x of them would only warn)."""
    props = dict(job.receive_props)
    props.update((PROPERTY_PREFIX + key, value) for key, value in job.props)
    if not here:        # a restore: the node's gate keeps from it what could mount there
        return props, []
    props.update((key, value) for key, value in RECEIVE_OVERRIDES[src.type].items()
                 if may_set is None or key in may_set)
    excludes = [key for key in RECEIVE_EXCLUDES[src.type] if may_set is None or key in may_set]
    excludes += [PROPERTY_PREFIX + key for key in RECORDED_KEYS
                 if PROPERTY_PREFIX + key not in props]
    return props, excludes


def step_is_full(step) -> bool:
    return isinstance(step, SendStep) and step.base is None


def describe_step(step) -> str:
    if isinstance(step, ResumeStep):
        return 'resumed a partial receive'
    if step.base is None:
        return 'full @' + step.snapshot.name
    return 'incremental {}..@{}'.format(step.base.ref, step.snapshot.name)


def received_bytes(recv_output: str) -> int:
    """What zfs recv -v says it received ('received 12.5M stream in 2 seconds')."""
    total = 0
    for number, unit in re.findall(r'received ([\d.]+)([BKMGTPE]?)B? stream', recv_output):
        total += int(float(number) * 1024 ** 'BKMGTPE'.index(unit or 'B'))
    return total


def format_bytes(count: float) -> str:
    if count < 1024:
        return '{} B'.format(int(count))
    for unit in ('KiB', 'MiB', 'GiB', 'TiB'):
        count /= 1024
        if count < 1024 or unit == 'TiB':
            return '{:.1f} {}'.format(count, unit)


def format_result(result: JobResult) -> str:
    if result.status == 'synced':
        rate = result.sent / result.seconds if result.seconds else 0
        return '{}: {}; {} in {:.1f} s ({}/s)'.format(
            result.job.dst, result.detail, format_bytes(result.sent),
            result.seconds, format_bytes(rate))
    if result.status == 'up-to-date':
        return '{}: up to date, {}'.format(result.job.dst, result.detail)
    return '{}: {}: {}'.format(result.job.dst, result.status.upper(), result.detail)


def format_summary(command: str, results: Sequence[JobResult], seconds: float) -> str:
    counts = {status: sum(r.status == status for r in results)
              for status in ('synced', 'up-to-date', 'failed', 'skipped')}
    return '{}: {} volume(s): {} synced, {} up to date, {} failed, {} skipped; {} in {:.1f} s'.format(
        command, len(results), counts['synced'], counts['up-to-date'],
        counts['failed'], counts['skipped'],
        format_bytes(sum(r.sent for r in results)), seconds)


# ==============================================================================
# Status: how old each backup is, for people and for monitors
# ==============================================================================

NAGIOS_EXIT = {'ok': 0, 'warning': 1, 'critical': 2}


@dataclasses.dataclass(frozen=True)
class BackupStatus:
    """One volume's backup, as status reports it."""
    vmid: int
    guest: str
    dataset: str                    # on the backup host
    newest: Optional[Snapshot]      # its newest snapshot
    used: int                       # bytes, with snapshots
    source_newer: Optional[int]     # bytes the source wrote since; None: unknown
    state: str                      # ok, warning, critical
    reasons: Tuple[str, ...] = ()


def backup_status(vmid, guest, dataset, dst: Optional[Dataset], src: Optional[Dataset],
                  now: float, warn_age: Optional[float], max_age: Optional[float],
                  source_note: str = '') -> BackupStatus:
    """Judge one backup: critical when missing or older than max_age (seconds),
    warning when older than warn_age."""
    snapshots = [s for s in (dst.snapshots if dst else ()) if not s.bookmark]
    newest = snapshots[-1] if snapshots else None
    reasons = [source_note] if source_note else []
    state = 'ok'
    if newest is None:
        state = 'critical'
        reasons.insert(0, 'no backup' if dst is None else 'no snapshot')
    else:
        age = now - newest.creation
        for limit, level in ((max_age, 'critical'), (warn_age, 'warning')):
            if limit is not None and age > limit:
                state = level
                reasons.insert(0, 'older than {}'.format(format_age(limit)))
                break
    if dst is not None and dst.resume_token:
        reasons.append('a partial transfer waits to be resumed')
    newer = source_newer_bytes(src, newest) if src and newest else None
    return BackupStatus(vmid, guest, dataset, newest, dst.used if dst else 0,
                        newer, state, tuple(reasons))


def source_newer_bytes(src: Dataset, newest: Snapshot) -> Optional[int]:
    """What the source wrote after the backup's newest snapshot; None when the
    source no longer has that snapshot (nor its bookmark)."""
    base = next((s for s in src.snapshots if s.guid == newest.guid), None)
    if base is None:
        return None
    return src.written + sum(s.written for s in src.snapshots
                             if not s.bookmark and s.createtxg > base.createtxg)


def format_age(seconds: float) -> str:
    if seconds < 90:
        return '{:.0f} s'.format(seconds)
    if seconds < 5400:
        return '{:.0f} min'.format(seconds / 60)
    if seconds < 3 * 86400:
        return '{:.1f} h'.format(seconds / 3600)
    return '{:.1f} d'.format(seconds / 86400)


def overall_state(rows: Sequence[BackupStatus]) -> str:
    return max((r.state for r in rows), key=NAGIOS_EXIT.get, default='ok')


def format_status(rows: Sequence[BackupStatus], now: float) -> List[str]:
    """A summary line first (what Nagios shows), then one line per volume."""
    counts = {state: sum(r.state == state for r in rows) for state in NAGIOS_EXIT}
    lines = ['{}: {} volume(s): {} ok, {} warning, {} critical'.format(
        overall_state(rows).upper(), len(rows), counts['ok'], counts['warning'],
        counts['critical'])]
    table = [('VMID', 'GUEST', 'VOLUME', 'NEWEST', 'AGE', 'USED', 'SOURCE NEWER', 'STATE')]
    for row in rows:
        table.append((
            str(row.vmid), row.guest, row.dataset.rsplit('/', 1)[-1],
            row.newest.name if row.newest else '-',
            format_age(now - row.newest.creation) if row.newest else '-',
            format_bytes(row.used) if row.newest else '-',
            '?' if row.source_newer is None else format_bytes(row.source_newer),
            row.state + (': ' + '; '.join(row.reasons) if row.reasons else '')))
    return lines + format_table(table)


def format_table(table: Sequence[Sequence[str]]) -> List[str]:
    """Rows of cells as lines, each column as wide as its widest cell."""
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    return ['  '.join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
            for cells in table]


def status_row(row: BackupStatus) -> dict:
    return dict(vmid=row.vmid, guest=row.guest, dataset=row.dataset,
                newest=row.newest.name if row.newest else None,
                created=iso_time(row.newest.creation) if row.newest else None,
                used=row.used, source_newer=row.source_newer, state=row.state,
                reasons=list(row.reasons))


PROMETHEUS_METRICS = (
    ('planb_pvesync_backup_timestamp_seconds', 'When the newest snapshot of the backup was made.',
     lambda row: row.newest.creation if row.newest else None),
    ('planb_pvesync_backup_used_bytes', 'Space the backup takes on the backup host, snapshots included.',
     lambda row: row.used),
    ('planb_pvesync_source_newer_bytes', 'Bytes the source wrote after the newest snapshot of the backup.',
     lambda row: row.source_newer),
    ('planb_pvesync_backup_state', 'The state of the backup: 0 ok, 1 warning, 2 critical.',
     lambda row: NAGIOS_EXIT[row.state]),
)


def prometheus_text(cluster: str, rows: Sequence[BackupStatus], now: float) -> str:
    """The figures of `status` in the Prometheus text format, for the node
    exporter's textfile collector."""
    lines = []
    for name, help_text, value in PROMETHEUS_METRICS:
        lines += ['# HELP {} {}'.format(name, help_text), '# TYPE {} gauge'.format(name)]
        for row in rows:
            if value(row) is not None:
                labels = dict(cluster=cluster, vmid=row.vmid, guest=row.guest,
                              dataset=row.dataset)
                lines.append('{}{{{}}} {}'.format(name, ','.join(
                    '{}="{}"'.format(k, _prometheus_escape(v)) for k, v in labels.items()),
                    value(row)))
    lines += ['# HELP planb_pvesync_status_timestamp_seconds When these figures were taken.',
              '# TYPE planb_pvesync_status_timestamp_seconds gauge',
              'planb_pvesync_status_timestamp_seconds {}'.format(int(now))]
    return '\n'.join(lines) + '\n'


def _prometheus_escape(value) -> str:
    return str(value).replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def write_atomically(path: str, text: str):
    """Readers (the textfile collector) see the old file or the new, never half."""
    tmp = '{}.{}.tmp'.format(path, os.getpid())
    with open(tmp, 'w', encoding='utf-8') as fp:
        fp.write(text)
    os.replace(tmp, path)


# ==============================================================================
# Restore: a guest, a disk or files back from the backups
# ==============================================================================

# Restore points made readable (mount-restore-point) are clones under
# ROOT/_restore: no guest can have that name (PVE names are DNS names).
RESTORE_CLONES = '_restore'
MOUNTED_AT = PROPERTY_PREFIX + 'mounted-at'
PVE_VOLUME_NAME = re.compile(r'(vm|base|subvol|basevol)-(\d+)-(.+)')
# Config keys that PVE writes itself or that belong to the original alone.
UNCREATABLE_KEYS = frozenset(('digest', 'lock', 'meta', 'parent', 'snaptime', 'snapstate',
                              'pending', 'vmstate', 'runningmachine', 'runningcpu'))
# What the create call takes besides the config, never taken from a kept one.
CREATE_PARAMETERS = frozenset((
    'archive', 'force', 'start', 'pool', 'unique', 'storage', 'bwlimit', 'live-restore',
    'ha-managed', 'import-working-storage', 'ostemplate', 'restore', 'password',
    'ssh-public-keys', 'ignore-unpack-errors', 'node', 'vmid'))
CONFIG_KEY = re.compile(r'[a-z][a-z0-9_-]*')
# What PVE answers for a secret in a config (cipassword).
MASKED_VALUE = '**********'
# The VM config keys a user other than root@pam may set, as qemu-server checks
# a create call (check_vm_modify_config_perm in PVE/API2/Qemu.pm; the same
# lists in PVE 8.4 and 9.x): its option lists, and the drives. Any other key
# (args, hookscript, affinity, hugepages, vmgenid, ...) only root@pam may set;
# serial, usb and hostpci devices only when not the host's own (qemu_root_only).
QEMU_USER_KEYS = frozenset('''
    cores cpu cpulimit cpuunits numa smp sockets vcpus
    memory balloon shares allow-ksm
    acpi hotplug kvm machine scsihw smbios1 tablet vga watchdog audio0 rng0
    agent autostart bios description keyboard localtime migrate_downtime migrate_speed name
    onboot ostype protection reboot startdate startup tdf template
    freeze boot bootdisk vmstatestorage
    cicustom cipassword citype ciuser ciupgrade nameserver searchdomain sshkeys
    cdrom tags'''.split())
QEMU_USER_KEY = re.compile(r'(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0|unused\d+|numa\d+|'
                           r'net\d+|ipconfig\d+|virtiofs\d+')
# Container keys only root@pam may set (pve-container's check_ct_modify_config_perm):
# raw lxc.* lines, device passthrough, a hook script; features: see lxc_root_only.
LXC_ROOT_KEY = re.compile(r'lxc|dev\d+|hookscript')
MAC_OPTION = re.compile(r'(?:^|(?<=,))(?:hwaddr|macaddr)=[^,]*,?')
# The container template restore-pve-guest creates containers from: it holds
# nothing, so the restored root file system stays as it was.
EMPTY_TEMPLATE = 'planb-pvesync-empty.tar.gz'
# What the restore user needs on the new guest's /vms/VMID (PVE checks
# them in its create call); see restore_privileges for the rest.
RESTORE_GUEST_PRIVILEGES = ('VM.Allocate', 'VM.Config.CPU', 'VM.Config.Memory',
                            'VM.Config.Disk', 'VM.Config.Network', 'VM.Config.Options',
                            'VM.Config.HWType', 'VM.Config.CDROM', 'VM.Config.Cloudinit')
MOUNT_OPTIONS = {'ext2': 'ro,noload', 'ext3': 'ro,noload', 'ext4': 'ro,noload',
                 'xfs': 'ro,norecovery,nouuid', 'btrfs': 'ro,norecovery', 'vfat': 'ro',
                 'ntfs': 'ro', 'ntfs3': 'ro'}


@dataclasses.dataclass(frozen=True)
class GuestBackup:
    """A guest's volumes on the backup host, found by what the backups recorded."""
    vmid: int
    label: str                      # its name under the backup root
    volumes: Tuple[Dataset, ...]


@dataclasses.dataclass(frozen=True)
class RestorePoint:
    name: str                       # the snapshot's name
    created: int                    # seconds since the epoch
    volumes: Tuple[str, ...]        # the datasets that have it
    config: Optional[str] = None    # the config kept with it (kept_config)


@dataclasses.dataclass(frozen=True)
class VolumeRestore:
    """One volume going back: from its backup to a new dataset on a node."""
    backup: Dataset
    key: Optional[str]              # its config key (scsi0, rootfs); None: no config
    storage: str                    # the target storage
    volume: str                     # its name there, as PVE names it: vm-9106-disk-0
    dataset: str                    # the target dataset: pool/volume
    options: str = ''               # the config's drive options (size=8M, mp=/data, ...)

    @property
    def volid(self) -> str:
        return '{}:{}'.format(self.storage, self.volume)


def find_guest_backup(found: Dict[str, Dataset], root: str, cluster: str,
                      word: str) -> GuestBackup:
    """The backups of the guest with vmid or name `word` in `cluster`, by what
    they recorded: the guest (or its whole cluster) may be gone."""
    guests = {}     # vmid -> [Dataset], by vmid first, else by name
    for by_name in (False, True):
        for dataset in found.values():
            parent = dataset.name.rpartition('/')[0]
            vmid = dataset.recorded.get('vmid', '')
            if (parent.rpartition('/')[0] == root and vmid.isdigit()
                    and dataset.recorded.get('cluster') == cluster
                    and word == (parent.rpartition('/')[2] if by_name else vmid)):
                guests.setdefault(int(vmid), []).append(dataset)
        if guests:
            break
    if not guests:
        raise UsageError('no backup of guest {!r} of cluster {} in {}; see what there is: '
                         'zfs list -r -o name,planb-pvesync:vmid {}'.format(
                             word, cluster, root, root))
    if len(guests) > 1:
        raise UsageError('backups of several guests are called {!r}: vmid {}; give the '
                         'vmid'.format(word, ', '.join(map(str, sorted(guests)))))
    vmid, volumes = guests.popitem()
    volumes.sort(key=lambda d: d.name)
    return GuestBackup(vmid, volumes[0].name.rsplit('/', 2)[1], tuple(volumes))


def restore_points(backup: GuestBackup, configs: Dict[str, str]) -> List[RestorePoint]:
    """Every snapshot of the guest's volumes, oldest first, with the volumes
    that have it and its kept config (`configs`: by snapshot name)."""
    points = {}     # name -> (created, [dataset])
    for volume in backup.volumes:
        for snap in volume.snapshots:
            if not snap.bookmark:
                created, names = points.setdefault(snap.name, (snap.creation, []))
                names.append(volume.name)
    return sorted((RestorePoint(name, created, tuple(names), configs.get(name))
                   for name, (created, names) in points.items()),
                  key=lambda p: (p.created, p.name))


def choose_restore_point(points: Sequence[RestorePoint], name: Optional[str],
                         label: str) -> RestorePoint:
    """The restore point called `name` (with or without its @), else the newest."""
    if not points:
        raise UsageError('the backups of {} have no snapshot to restore'.format(label))
    if name is None:
        return points[-1]
    for point in points:
        if point.name == name.lstrip('@'):
            return point
    raise UsageError('{} has no restore point @{}; list them: planb-pvesync '
                     'list-restore-points -g {}'.format(label, name.lstrip('@'), label))


def restored_volume_name(name: str, vmid: int, filesystem: bool) -> str:
    """The name PVE gives a volume of guest `vmid`: vm-106-disk-0 becomes
    vm-9106-disk-0; a template's base-* disk comes back as a plain one."""
    match = PVE_VOLUME_NAME.fullmatch(name)
    kind = {'base': 'vm', 'basevol': 'subvol'}.get(match.group(1), match.group(1)) \
        if match else ('subvol' if filesystem else 'vm')
    return '{}-{}-{}'.format(kind, vmid, match.group(3) if match else name)


def next_free_name(name: str, taken: Collection[str]) -> str:
    """`name`, or the same with the next disk number no dataset has yet."""
    match = re.fullmatch(r'(.*-disk-)(\d+)', name)
    number = int(match.group(2)) if match else 0
    while name in taken:
        number += 1
        name = '{}{}'.format(match.group(1) if match else name + '-disk-', number)
    return name


def kept_volumes(kept: dict, backup: GuestBackup) -> Tuple[list, Dict[str, str]]:
    """The volumes the kept config names, with their backups: [(key, backup
    dataset, storage, drive options)]; and the keys without a backup."""
    by_origin = {(d.recorded.get('storage'), d.recorded.get('volume')): d
                 for d in backup.volumes}
    kind, config = kept['type'], kept['config']
    key_re = QEMU_VOLUME_KEY if kind == 'qemu' else LXC_VOLUME_KEY
    boot = _boot_order(config) if kind == 'qemu' else ['rootfs']
    found, missing = [], {}
    for key, value in sorted(config.items(), key=lambda kv: (
            kv[0] not in boot[:1], _natural_key(kv[0]))):
        source, opts = _split_drive(str(value))
        storage_id, colon, volume = source.partition(':')
        if not key_re.fullmatch(key) or not colon or opts.get('media') == 'cdrom':
            continue
        dataset = by_origin.get((storage_id, volume))
        if dataset is None:
            missing[key] = 'not backed up: ' + (
                _skip_reason(kind, key, opts, PveStorage(storage_id, 'zfspool', True, None,
                                                         'pool', None))
                or 'not on ZFS, or not synced yet')
        else:
            found.append((key, dataset, storage_id, str(value).partition(',')[2]))
    return found, missing


def plan_restore(kept: Optional[dict], backup: GuestBackup, point: RestorePoint,
                 vmid: int, storages: Dict[str, PveStorage], node: str,
                 storage: Optional[str] = None, wanted: Sequence[str] = ()
                 ) -> Tuple[List[VolumeRestore], Dict[str, str]]:
    """Which volumes go back, to which storage and under which names; and,
    for each config key that does not come back, why. Pure."""
    if kept is None:
        candidates, dropped = [(None, d, d.recorded.get('storage'), '')
                               for d in backup.volumes], {}
    else:
        candidates, dropped = kept_volumes(kept, backup)
    chosen = []
    for key, dataset, storage_id, options in candidates:
        names = {key, dataset.name.rsplit('/', 1)[-1],
                 dataset.recorded.get('volume', '').rsplit('/', 1)[-1]}
        if wanted and not names & set(wanted):
            if key:
                dropped[key] = 'not asked for (--volume)'
        elif dataset.name not in point.volumes:
            if key:
                dropped[key] = 'not in restore point @{}'.format(point.name)
        else:
            chosen.append((key, dataset, storage or storage_id, options))
    if not chosen:
        raise UsageError('{} has no volume{} at @{}'.format(
            backup.label, ' ' + ', '.join(wanted) if wanted else '', point.name))
    return [_volume_restore(key, dataset, target, options, vmid, storages, node)
            for key, dataset, target, options in chosen], dropped


def _volume_restore(key, dataset, storage_id, options, vmid, storages, node):
    target = storages.get(storage_id)
    filesystem = dataset.type == 'filesystem'
    if not (target and target.type == 'zfspool' and target.pool and target.enabled
            and target.on_node(node)):
        raise UsageError('storage {} is no ZFS pool storage on node {}; choose one with '
                         '--storage'.format(storage_id, node))
    content = 'rootdir' if filesystem else 'images'
    if target.content and content not in target.content:
        raise UsageError('storage {} holds no {} (content={}); choose another with '
                         '--storage'.format(storage_id, content, ','.join(sorted(target.content))))
    name = restored_volume_name(dataset.recorded.get('volume', dataset.name).rsplit('/', 1)[-1],
                                vmid, filesystem)
    return VolumeRestore(dataset, key, storage_id, name, '{}/{}'.format(target.pool, name),
                         options)


def restore_states(volumes: Sequence[VolumeRestore], point: str,
                   existing: Dict[str, Dataset]) -> Dict[str, str]:
    """What each target dataset needs, by name: 'full' (it does not exist),
    'resume' (a receive was cut off), 'done' (this restore made it, from this
    point, and it is unchanged since) or 'exists' (something else is there:
    sharing the restore point's snapshot is not enough, a live disk whose
    source keeps the tool's snapshots does)."""
    states = {}
    for volume in volumes:
        found = existing.get(volume.dataset)
        wanted = next(s.guid for s in volume.backup.snapshots
                      if not s.bookmark and s.name == point)
        if found is None:
            states[volume.dataset] = 'full'
        elif found.resume_token:
            states[volume.dataset] = 'resume'
        else:
            newest = [s.guid for s in found.snapshots if not s.bookmark][-1:]
            made_here = found.recorded.get('restored-from') == restore_mark(volume, point)
            states[volume.dataset] = ('done' if made_here and newest == [wanted]
                                      and not found.written else 'exists')
    return states


def restore_mark(volume: VolumeRestore, point: str) -> str:
    """What a restore's receive records on the volume it makes
    (planb-pvesync:restored-from): the backup and the restore point."""
    return '{}@{}'.format(volume.backup.name, point)


def subvolume_props(options: str) -> Dict[str, str]:
    """The properties PVE gives a container's subvolume, its size as its quota."""
    props = {'acltype': 'posixacl', 'xattr': 'sa'}
    size = _split_drive(',' + options)[1].get('size')
    if size:
        props['refquota'] = size
    return props


def restored_config(kept: dict, volumes: Sequence[VolumeRestore], dropped: Dict[str, str],
                    keep_macs: bool = False) -> Tuple[dict, List[str]]:
    """The config to create the restored guest with, and a note for each thing
    left out or changed. Volumes get their new names; MAC addresses are made
    anew unless `keep_macs`, the VM generation id always (PVE makes one for a
    config without it). Only config keys are taken, and of them none that only
    root@pam may set (root_only: a restore never sets a hook script or raw
    arguments from a kept config), nor a value PVE showed masked. Pure."""
    kind, config = kept['type'], kept['config']
    volids = {v.key: '{},{}'.format(v.volid, v.options) if v.options else v.volid
              for v in volumes}
    key_re = QEMU_VOLUME_KEY if kind == 'qemu' else LXC_VOLUME_KEY
    new, notes = {}, []
    for key, value in config.items():
        value = str(value)
        source, opts = _split_drive(value)
        if key in UNCREATABLE_KEYS or key == 'vmgenid':
            continue        # vmgenid: PVE makes a new one, so the guest sees it was restored
        if key in CREATE_PARAMETERS or not CONFIG_KEY.fullmatch(key):
            notes.append('{}: left out, not a config key'.format(key))
        elif value == MASKED_VALUE:
            notes.append('{}: left out, PVE shows it masked; set it anew'.format(key))
        elif key in volids:
            new[key] = volids[key]
        elif kind == 'qemu' and opts.get('media') == 'cdrom':
            new[key], note = _restored_cdrom(key, source, value)
            notes += [note] if note else []
        elif key_re.fullmatch(key):
            notes.append('{}: {}, left out ({})'.format(key, source, dropped.get(
                key, 'only root@pam may create a bind mount; add it by hand'
                if source.startswith('/') else 'not backed up')))
        elif root_only(kind, key, value, config):
            notes.append('{}: left out, only root@pam may set it'.format(key))
        elif key == 'template' and value == '1':
            notes.append('restored as a guest, not as a template')
        elif key.startswith('net') and not keep_macs:
            new[key] = _without_mac(kind, value)
        else:
            new[key] = value
    _drop_missing_boot_devices(new, config)
    if kind == 'lxc':
        new.setdefault('unprivileged', '0')     # absent means privileged
    return new, notes


def root_only(kind: str, key: str, value: str, config: dict) -> bool:
    """Whether only root@pam may create a guest with this config key (and
    value), as PVE checks a create call."""
    if kind == 'lxc':
        return bool(LXC_ROOT_KEY.fullmatch(key)) or (key == 'features' and (
            str(config.get('unprivileged')) != '1' or _features(value) != {'nesting'}))
    device = _split_drive(',' + value)[1]
    if re.fullmatch(r'serial\d+', key):
        return value != 'socket'
    if re.fullmatch(r'usb\d+', key):
        return 'host' in device and device['host'].lower() != 'spice'
    if re.fullmatch(r'hostpci\d+', key):
        return 'mapping' not in device or 'romfile' in device
    return not (key in QEMU_USER_KEYS or QEMU_USER_KEY.fullmatch(key))


def _features(value) -> Set[str]:
    """The container features switched on: nesting=1,keyctl=1 -> {nesting, keyctl}."""
    return {name for name, _, on in (item.partition('=') for item in value.split(',') if item)
            if on not in ('0', '')}


def _restored_cdrom(key, source, value):
    """(value, note): cloud-init drives are made anew; an ISO is not inserted."""
    if source in ('none', 'cdrom', ''):
        return value, None
    storage, _, volume = source.partition(':')
    if 'cloudinit' in volume:
        return '{}:cloudinit,media=cdrom'.format(storage), None
    return 'none,media=cdrom', '{}: {} not inserted'.format(key, source)


def _without_mac(kind, value):
    if kind == 'qemu':      # virtio=BC:24:11:3A:10:06,bridge=vmbr0: PVE makes a new one
        model, _, rest = value.partition(',')
        value = model.partition('=')[0] + (',' + rest if rest else '')
    return MAC_OPTION.sub('', value).rstrip(',')


def _drop_missing_boot_devices(new, config):
    boot = new.get('boot', '')
    if boot.startswith('order='):
        order = [dev for dev in boot[len('order='):].split(';')
                 if dev in new or not (QEMU_VOLUME_KEY.fullmatch(dev) and dev in config)]
        new['boot'] = 'order=' + ';'.join(order)
    if new.get('bootdisk') and new['bootdisk'] not in new:
        del new['bootdisk']


def read_kept_configs(host, backup: GuestBackup) -> Dict[str, str]:
    """The configs kept with the guest's snapshots, by snapshot name: one zfs
    get. Only those this host set (-s local): a node's stream may bring its
    snapshots with values of their own."""
    out = host.run(host.zfs('get', '-H', '-p', '-d', '1', '-t', 'snapshot', '-s', 'local',
                            '-o', 'name,value', PROPERTY_PREFIX + 'config',
                            *(v.name for v in backup.volumes)))
    configs = {}
    for line in out.splitlines():
        name, _, value = line.partition('\t')
        if value not in ('', '-'):
            configs.setdefault(name.partition('@')[2], value)
    return configs


def empty_template_tarball() -> bytes:
    """A gzipped tar archive without members: two zero blocks, padded as tar pads."""
    return gzip.compress(bytes(10240), mtime=0)


def template_storage(cluster: PveCluster, node: str, wanted: Optional[str] = None) -> str:
    """The storage on `node` for the empty container template: `wanted`, else
    local, else the first one for templates."""
    fits = sorted(s.storage for s in cluster.storages.values()
                  if s.enabled and s.on_node(node) and 'vztmpl' in s.content
                  and wanted in (None, s.storage))
    if not fits:
        raise UsageError('no storage on {} holds container templates (content vztmpl){}; '
                         'name one with --template-storage'.format(
                             node, '' if wanted is None else ' called ' + wanted))
    return 'local' if 'local' in fits else fits[0]


def empty_template(api: PveApi, node: str, storage: str) -> str:
    """The volid of the empty container template on `node`, uploaded the first
    time: PVE creates a container only from a template."""
    volid = '{}:vztmpl/{}'.format(storage, EMPTY_TEMPLATE)
    path = 'nodes/{}/storage/{}/'.format(node, storage)
    if not any(item.get('volid') == volid for item in api.get(path + 'content', content='vztmpl')):
        api.wait(node, api.upload(path + 'upload', EMPTY_TEMPLATE, empty_template_tarball(),
                                  content='vztmpl'))
        log.info('%s: uploaded the empty container template %s', node, volid)
    return volid


def restore_privileges(kind: str, vmid: int, config: dict, storages: Collection[str],
                       template: Optional[str], start: bool) -> Dict[str, Set[str]]:
    """The privileges creating the guest takes, by ACL path: what
    check_privileges asks the API about before anything is sent. Pure."""
    guest = set(RESTORE_GUEST_PRIVILEGES) | ({'VM.PowerMgmt'} if start else set())
    needs = {'/vms/{}'.format(vmid): guest}
    for storage in storages:
        needs.setdefault('/storage/' + storage, set()).add('Datastore.AllocateSpace')
    if template:
        needs.setdefault('/storage/' + template, set()).add('Datastore.AllocateTemplate')
    if kind == 'lxc' and str(config.get('unprivileged')) != '1':
        needs['/'] = {'Sys.Modify'}     # a privileged container
    for key, value in config.items():
        bridge = re.search(r'(?:^|,)bridge=([^,]+)', value) if key.startswith('net') else None
        if bridge:
            needs['/sdn/zones/localnetwork/' + bridge.group(1)] = {'SDN.Use'}
        mapping = _mapping_path(key, value)
        if mapping:
            needs[mapping] = {'Mapping.Use'}
    if 'startup' in config:         # it changes how the node boots
        needs.setdefault('/', set()).add('Sys.Modify')
    if 'freeze' in config:
        guest.add('VM.PowerMgmt')
    return needs


def _mapping_path(key: str, value: str) -> Optional[str]:
    """The ACL path of the cluster's resource mapping a VM config key uses."""
    first, options = value.split(',')[0], _split_drive(',' + value)[1]
    if re.fullmatch(r'(hostpci|usb)\d+', key) and 'mapping' in options:
        return '/mapping/{}/{}'.format('pci' if key.startswith('h') else 'usb', options['mapping'])
    if re.fullmatch(r'virtiofs\d+', key):
        return '/mapping/dir/' + options.get('dirid', first)
    if key == 'rng0' and '/dev/hwrng' in (first, options.get('source')):
        return '/mapping/hwrng'
    cputype = options.get('cputype', first) if key == 'cpu' else ''
    if cputype.startswith('custom-'):
        return '/mapping/cpu/' + cputype[len('custom-'):]
    return None


def check_privileges(api: PveApi, needs: Dict[str, Set[str]]):
    """PveError naming every privilege the API user lacks, before anything
    changes (GET /access/permissions: what the user may do there)."""
    gaps = []
    for path, privileges in sorted(needs.items()):
        have = api.get('access/permissions', path=path).get(path, {})
        gaps += ['{} on {}'.format(p, path) for p in sorted(privileges) if p not in have]
    if gaps:
        raise PveError('{} may not create the guest: it lacks {}; nothing was sent (README.rst, '
                       'Restore, lists the role a restore user needs)'.format(
                           api.cluster.user, ', '.join(gaps)))


def create_guest(api: PveApi, node: str, kind: str, vmid: int, config: dict,
                 template: Optional[str] = None):
    """Define the guest on `node` around its restored volumes. A container is
    made from the empty template as 'unmanaged', so that PVE's setup touches
    nothing in it, and gets its own OS type back after."""
    path = 'nodes/{}/{}'.format(node, kind)
    if kind == 'qemu':
        api.wait(node, api.post(path, vmid=vmid, **config))
        return
    config = dict(config)
    ostype = config.pop('ostype', 'unmanaged')
    api.wait(node, api.post(path, vmid=vmid, ostemplate=template, ostype='unmanaged',
                            **config))
    if ostype != 'unmanaged':
        api.put('{}/{}/config'.format(path, vmid), ostype=ostype)


def restore_clone_name(root: str, backup: GuestBackup, volume: Dataset, point: str) -> str:
    return '{}/{}/{}--{}--{}'.format(root, RESTORE_CLONES, backup.label,
                                     volume.name.rsplit('/', 1)[-1], point)


def partitions(device: str) -> List[Tuple[str, Optional[str]]]:
    """(device, file system type) of each partition of a zvol clone, or of
    the zvol itself when it holds a file system without partitions."""
    folder, base = os.path.split(device)
    parts = sorted((os.path.join(folder, name) for name in os.listdir(folder)
                    if re.fullmatch(re.escape(base) + r'-part\d+', name)),
                   key=lambda path: int(path.rpartition('-part')[2]))
    return [(path, _fs_type(path)) for path in parts or [device]]


def _fs_type(device) -> Optional[str]:
    done = subprocess.run(['blkid', '-o', 'value', '-s', 'TYPE', device],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return done.stdout.strip() or None


def choose_partition(parts: Sequence[Tuple[str, Optional[str]]], number: Optional[int],
                     what: str) -> Tuple[str, str]:
    """(device, type) of partition `number`, else of the one partition with a
    file system we can mount."""
    described = ', '.join('{} {}'.format(_partition_number(dev), fs or 'no file system')
                          for dev, fs in parts)
    if number is not None:
        found = [(dev, fs) for dev, fs in parts if _partition_number(dev) == number]
        if not found:
            raise UsageError('{} has no partition {} (it has: {})'.format(what, number, described))
        dev, fs = found[0]
        if fs not in MOUNT_OPTIONS:
            raise UsageError('partition {} of {} holds {}, which cannot be mounted here{}'.format(
                number, what, fs or 'no file system', '; activate LVM by hand (vgchange -ay), '
                'see README.rst' if fs == 'LVM2_member' else ''))
        return dev, fs
    mountable = [(dev, fs) for dev, fs in parts if fs in MOUNT_OPTIONS]
    if len(mountable) != 1:
        raise UsageError('{} has {} partitions with a file system to mount ({}); choose '
                         'one with --partition N'.format(what, len(mountable) or 'no', described))
    return mountable[0]


def _partition_number(device) -> int:
    return int(device.rpartition('-part')[2]) if '-part' in device else 0


# ==============================================================================
# PlanB: the tool as a fileset's exec transport, one guest per fileset
# ==============================================================================

# PlanB names a run's snapshot PREFIX-YYYYMMDDTHHMMZ (UTC, to the minute) and
# rotates only names of that shape; it takes any other name for a manual one.
PLANB_SNAPSHOT = re.compile(r'([a-z0-9]([a-z0-9-]*[a-z0-9])?-)?[0-9]{8}T[0-9]{4}Z')
PLANB_GUID = re.compile(r'[A-Za-z0-9][A-Za-z0-9._:-]*')
# A dataset under PlanB's pool: what ZFS takes, spaces too (PlanB takes any
# friendly name for a fileset, and ZFS refuses what it cannot take).
PLANB_DATASET = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.: -]*(/[A-Za-z0-9_.: -]+)+')
PLANB_ENVIRONMENT = ('planb_guid', 'planb_storage_name', 'planb_snapshot_target')
# planb:contains=filesystems: PlanB rotates the fileset dataset's children, and
# sums their sizes, instead of the dataset itself.
PLANB_CONTAINS = 'planb:contains'
# The transport's flags a fileset needs: the tool makes the snapshot PlanB
# names (so PlanB makes none of the empty dataset), PlanB rotates the children.
PLANB_FLAGS = (('can_create_snapshot', True), ('can_rotate_snapshot', False))


@dataclasses.dataclass(frozen=True)
class PlanbFileset:
    """What PlanB's exec transport tells its command about the fileset."""
    guid: str               # planb_guid: this PlanB install
    dataset: str            # planb_storage_name: POOL/HOSTGROUP-NAME
    snapshot: str           # planb_snapshot_target: PREFIX-YYYYMMDDTHHMMZ
    data_dir: str = ''      # planb_storage_destination: its mounted data/


def planb_fileset(environ) -> PlanbFileset:
    """PlanB's environment, checked; a UsageError outside PlanB."""
    missing = [key for key in PLANB_ENVIRONMENT if not environ.get(key)]
    if missing:
        raise UsageError('planb-transport is the transport_command of a PlanB '
                         'fileset, and PlanB sets {}; not set here: {} (see '
                         'list-planb-filesets)'.format(', '.join(PLANB_ENVIRONMENT),
                                                       ', '.join(missing)))
    fileset = PlanbFileset(environ['planb_guid'], environ['planb_storage_name'],
                           environ['planb_snapshot_target'],
                           environ.get('planb_storage_destination', ''))
    for key, value, pattern in (('planb_guid', fileset.guid, PLANB_GUID),
                                ('planb_storage_name', fileset.dataset, PLANB_DATASET),
                                ('planb_snapshot_target', fileset.snapshot, PLANB_SNAPSHOT)):
        if not pattern.fullmatch(value):
            raise UsageError('{}={!r} is not what PlanB sets'.format(key, value))
    return fileset


def planb_escape(text: str) -> str:
    """`text` as a dataset name that PlanB shows as `text` again, escaped as
    its own zfssync escapes: '/' becomes '-', and every byte but a letter, a
    digit, ':' and a '.' that does not lead becomes _xHH."""
    words = []
    for i, char in enumerate(text):
        if char == '/':
            words.append('-')
        elif char.isascii() and (char.isalnum() or char == ':' or (char == '.' and i)):
            words.append(char)
        else:
            words += ['_x{:02x}'.format(byte) for byte in char.encode()]
    return ''.join(words)


def planb_child(fileset: PlanbFileset, volume: PveVolume) -> str:
    """The dataset that receives `volume`: a child of the fileset's dataset
    (never the dataset itself: PlanB's data/ lives there), that PlanB lists
    as STORAGE/VOLUME."""
    return '{}/{}'.format(fileset.dataset, planb_escape(
        '{}/{}'.format(volume.storage, volume.name)))


def planb_sync_options(fileset: PlanbFileset, opts: SyncOptions) -> SyncOptions:
    """`opts` as PlanB needs them: the snapshot PlanB names, marked as this
    PlanB's (a second run in the same minute sends the one the first made),
    only this PlanB's snapshots pruned on the source, no retention here (PlanB
    rotates), and a volume another run holds waited for, not skipped."""
    return dataclasses.replace(
        opts, snapshot_name=fileset.snapshot, owner=fileset.guid, make_snapshot=True,
        snapshot_prefix=fileset.snapshot.rpartition('-')[0], snapshot_reuse_age=0,
        keep_destination=(), thin_foreign=False, wait=True)


def prepare_planb_dataset(host, fileset: PlanbFileset, dry_run: bool):
    """Check the fileset's dataset; the first time, mark it PLANB_CONTAINS
    =filesystems, unless its data/ holds files (another transport's)."""
    try:
        kind, contains = host.run(host.zfs(
            'get', '-H', '-p', '-o', 'value', 'type,' + PLANB_CONTAINS,
            fileset.dataset)).splitlines()
    except CommandError as exc:
        raise PvesyncError('planb_storage_name {}: {}; PlanB makes it before it runs '
                           'the transport'.format(fileset.dataset, exc))
    if kind != 'filesystem':
        raise PvesyncError('planb_storage_name {} is a {}, not the filesystem PlanB '
                           'makes for a fileset'.format(fileset.dataset, kind))
    if contains == 'filesystems':
        return
    if os.path.isdir(fileset.data_dir) and os.listdir(fileset.data_dir):
        raise PvesyncError(
            '{} holds files: this fileset was backed up by another transport, and '
            'PlanB would stop rotating their snapshots; give the guest a fileset of '
            'its own'.format(fileset.data_dir))
    cmd = host.zfs('set', PLANB_CONTAINS + '=filesystems', fileset.dataset)
    if dry_run:
        print('would run here: ' + shlex.join(cmd))
    else:
        host.run(cmd)
        log.info('%s: set %s=filesystems: PlanB rotates its children',
                 fileset.dataset, PLANB_CONTAINS)


def planb_pool_problems(host, pool: str) -> List[str]:
    """What keeps PlanB from making a fileset's dataset in `pool` (its
    POOLNAME): PlanB mounts each new dataset and then chowns its mountpoint
    with sudo (planb/storage/zfs.py), so the pool must be a filesystem with a
    mountpoint, and PlanB's user needs chown in its sudo rule."""
    try:
        kind, mountpoint = host.run(host.zfs('get', '-H', '-o', 'value', 'type,mountpoint',
                                             pool)).splitlines()
    except CommandError as exc:
        return ['PlanB\'s pool {}: {}'.format(pool, exc)]
    problems = []
    if kind != 'filesystem':
        problems.append('PlanB\'s pool {} is a {}, not a filesystem'.format(pool, kind))
    elif not mountpoint.startswith('/'):
        problems.append(
            'PlanB\'s pool {0} has mountpoint={1}, but PlanB mounts the dataset of each new '
            'fileset and chowns its mountpoint; give PlanB a dataset with a mountpoint, for '
            'example: zfs create -o mountpoint=/srv/backups {0}/planb (and POOLNAME '
            '{0}/planb)'.format(pool, mountpoint))
    if host.sudo:
        try:
            host.run(host.sudo + ['-l', 'chown'])
        except CommandError:
            problems.append('this user may not run chown with sudo, which PlanB does on the '
                            'mountpoint of each new fileset: add it to the sudo rule')
    return problems


def planb_kept_snapshots(found: Dict[str, Dataset], fileset: PlanbFileset
                         ) -> Tuple[List[str], List[str]]:
    """PlanB's "Enqueue + keep" snapshots the fileset's own dataset after the
    transport has ended (so does an admin's zfs snapshot of it): a restore
    point that holds no disk. Until the children receive again they are as
    they were then, so the next run takes the same name on them. Returns
    (CHILD@NAME to take; a note for each child that cannot take it: one
    received raw, onto which ZFS would receive the next raw stream only at its
    base, or one changed since). Only snapshots of the dataset newer than all
    the children received count: an older one is past mending. Pure."""
    parent = found.get(fileset.dataset)
    children = [d for name, d in sorted(found.items())
                if name.rpartition('/')[0] == fileset.dataset
                and any(not s.bookmark for s in d.snapshots)]
    if parent is None or not children:
        return [], []
    received = max(s.createtxg for d in children for s in d.snapshots if not s.bookmark)
    kept = [s.name for s in parent.snapshots if not s.bookmark and s.createtxg > received]
    specs, notes = [], []
    for child in children:
        have = {s.name for s in child.snapshots if not s.bookmark}
        missing = [name for name in kept if name not in have]
        why = ('it is received raw, and ZFS receives a raw stream only onto the snapshot it '
               'starts from' if child.encryption_root == child.name else
               'it was changed after its newest snapshot' if child.written else None)
        if missing and why:
            newest = [s.name for s in child.snapshots if not s.bookmark][-1]
            notes.append('{} cannot take @{} of {}: {}; restore its @{} instead'.format(
                child.name, ', @'.join(missing), fileset.dataset, why, newest))
        elif missing:
            specs += ['{}@{}'.format(child.name, name) for name in missing]
    return specs, notes


def take_planb_kept_snapshots(host, fileset: PlanbFileset, dry_run: bool):
    """planb_kept_snapshots, taken in one zfs snapshot (atomic), each with the
    config kept with the child's newest snapshot, which it equals."""
    found = list_datasets(host, [fileset.dataset], depth=2)
    specs, notes = planb_kept_snapshots(found, fileset)
    for note in notes:
        log.warning('%s', note)
    if not specs:
        return
    children = sorted({spec.partition('@')[0] for spec in specs})
    newest = ['{}@{}'.format(child, [s.name for s in found[child].snapshots
                                     if not s.bookmark][-1]) for child in children]
    configs = [line for line in host.run(host.zfs(
        'get', '-H', '-o', 'value', PROPERTY_PREFIX + 'config', *newest)).splitlines()
        if line not in ('', '-')]
    cmd = host.zfs('snapshot', *(['-o', '{}config={}'.format(PROPERTY_PREFIX, configs[0])]
                                 if configs else []), *specs)
    if dry_run:
        print('would run here: ' + shlex.join(cmd))
        return
    host.run(cmd)
    print('{}: took {} on its disks, as PlanB took it of the dataset alone'.format(
        fileset.dataset, ', '.join(sorted({'@' + s.partition('@')[2] for s in specs}))))


def planb_rotates(host, volume: str, snapshot: str) -> bool:
    """Whether PlanB's rotation will destroy `volume`@`snapshot`: a child of a
    fileset (PLANB_CONTAINS), a snapshot named as PlanB names a run's, and not
    one PlanB keeps ("Enqueue + keep" takes it of the fileset's dataset too)."""
    if not PLANB_SNAPSHOT.fullmatch(snapshot):
        return False
    fileset = volume.rpartition('/')[0]
    try:
        contains = host.run(host.zfs('get', '-H', '-o', 'value', PLANB_CONTAINS, fileset))
    except CommandError:
        return False
    if contains.strip() != 'filesystems':
        return False
    found = list_datasets(host, [fileset]).get(fileset)
    return not any(s.name == snapshot for s in (found.snapshots if found else ()))


def nothing_to_back_up(guest: PveGuest) -> Optional[str]:
    """Why the guest has no volume to back up; None when it has one, or its
    volumes are unknown."""
    if guest.volumes is None or any(v.skip is None for v in guest.volumes):
        return None
    return 'nothing to back up ({})'.format(
        ', '.join('{}: {}'.format(v.key, v.skip) for v in guest.volumes) or 'no disk')


def planb_fileset_rows(cluster: PveCluster, guests: Sequence[PveGuest],
                       command: Sequence[str]) -> List[dict]:
    """Each guest as a PlanB fileset: host group the cluster, friendly name
    the guest's (with its vmid where two guests share it), and the
    transport_command, `command` and the vmid."""
    names = [g.label for g in cluster.guests]
    rows = []
    for guest in guests:
        name = guest.label if names.count(guest.label) == 1 else '{}-{}'.format(
            guest.label, guest.vmid)
        volumes = None if guest.volumes is None else [
            '{}/{}'.format(v.storage, v.name) for v in guest.volumes if v.skip is None]
        rows.append(dict(
            hostgroup=cluster.name, friendly_name=name, vmid=guest.vmid, type=guest.type,
            node=guest.node, template=guest.template, volumes=volumes,
            note=nothing_to_back_up(guest) or guest.note,
            transport_command=shlex.join([*command, str(guest.vmid)]), **dict(PLANB_FLAGS)))
    return rows


def format_planb_filesets(rows: Sequence[dict]) -> List[str]:
    lines = []
    for row in rows:
        if row['volumes'] == []:
            lines.append('{hostgroup}/{friendly_name}(vmid={vmid};{note})'.format(**row))
            continue
        what = ('volumes unknown: ' + row['note'] if row['volumes'] is None
                else '{} volume(s)'.format(len(row['volumes'])))
        flags = ';'.join('{}={}'.format(key, 'yes' if row[key] else 'no')
                         for key, _ in PLANB_FLAGS)
        lines += ['{}/{}(vmid={};{}{};{})'.format(
            row['hostgroup'], row['friendly_name'], row['vmid'], what,
            ';template' if row['template'] else '', flags),
            '  ' + row['transport_command']]
    return lines


# ==============================================================================
# The command line
# ==============================================================================

def storage_target(config: Config, cluster_cfg: ClusterConfig, cluster: PveCluster,
                   storage: str, node: str) -> Tuple[str, SshSettings]:
    """Where ssh reaches `storage` on `node`: its [storage:] section, else the
    node's address from the cluster with the cluster's ssh settings."""
    section = config.storage(cluster_cfg.name, storage, node)
    if section:
        return section.target, cluster_cfg.ssh.merged(section.ssh)
    known = cluster.nodes.get(node)
    return (known.address if known else node), cluster_cfg.ssh


def format_hosts(cluster: PveCluster) -> List[str]:
    return ['{}/node/{}{}'.format(cluster.name, node.name,
                                  '' if node.online else '(offline)')
            for node in cluster.nodes.values()]


def filestore_rows(config, cluster_cfg, cluster) -> List[dict]:
    """One row per storage and node where it exists."""
    rows = []
    for storage in sorted(cluster.storages.values(), key=lambda s: s.storage):
        for node in cluster.nodes:
            if not storage.on_node(node):
                continue
            ssh = None
            if storage.type == 'zfspool':
                address, settings = storage_target(
                    config, cluster_cfg, cluster, storage.storage, node)
                ssh = settings.argv(address)
            rows.append(dict(cluster=cluster.name, storage=storage.storage, node=node,
                             type=storage.type, enabled=storage.enabled,
                             path=storage.path, pool=storage.pool, ssh=ssh))
    return rows


def format_filestores(rows: Sequence[dict]) -> List[str]:
    lines = []
    for row in rows:
        line = '{cluster}/{type}/{storage}@{node}({state};{where!r})'.format(
            state='on' if row['enabled'] else 'off',
            where=(row['path'], row['pool']), **row)
        lines += _with_remote_args(line, row['ssh'])
    return lines


def _with_remote_args(line, ssh):
    if not ssh:
        return [line]
    return [line + ' \\', '    run_remote_args={!r}'.format(ssh)]


def guest_rows(config, cluster_cfg, cluster, guests) -> List[dict]:
    rows = []
    for guest in guests:
        row = dict(cluster=cluster.name, vmid=guest.vmid, type=guest.type,
                   name=guest.name, node=guest.node, status=guest.status,
                   template=guest.template, pool=guest.pool, tags=list(guest.tags),
                   volumes=None, note=guest.note)
        if guest.volumes is not None:
            row['volumes'] = [_volume_row(config, cluster_cfg, cluster, guest, v)
                              for v in guest.volumes]
        rows.append(row)
    return rows


def _volume_row(config, cluster_cfg, cluster, guest, volume) -> dict:
    ssh = None
    if volume.skip is None:
        address, settings = storage_target(
            config, cluster_cfg, cluster, volume.storage, guest.node)
        ssh = settings.argv(address)
    return dict(key=volume.key, storage=volume.storage, volume=volume.volume,
                storage_type=volume.storage_type, dataset=volume.dataset,
                boot=volume.boot, sync=volume.skip is None, skip=volume.skip, ssh=ssh)


def format_guests(rows: Sequence[dict]) -> List[str]:
    lines = []
    for row in rows:
        state = {'running': 'on', 'stopped': 'off'}.get(row['status'], row['status'])
        lines.append('{}/{}/{}/{}({}{})'.format(
            row['cluster'], row['type'], row['vmid'], row['name'] or row['vmid'], state,
            ';template' if row['template'] else ''))
        if row['volumes'] is None:
            lines.append('  (volumes unknown: {})'.format(row['note']))
            continue
        for vol in row['volumes']:
            marks = ['vm={}'.format(row['vmid']), vol['key']]
            marks += ['BOOT'] if vol['boot'] else []
            marks += ['sync'] if vol['sync'] else ['skip:' + vol['skip']]
            line = '  {}/{}/{}/{}({})'.format(
                row['cluster'], vol['storage_type'] or '?', vol['storage'],
                vol['volume'].rsplit('/', 1)[-1], ';'.join(marks))
            lines += ['  ' + part if i else part
                      for i, part in enumerate(_with_remote_args(line, vol['ssh']))]
    return lines


def _print_listing(args, rows, formatter):
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        for line in formatter(rows):
            print(line)


GUEST_SYNC_COMMANDS = ('sync-pve-guest', 'planb-transport')


class Session:
    """What one command needs: the config, the cluster's API, ssh hosts."""

    def __init__(self, args):
        self.args = args
        self._config = None
        self._control_dir = None
        self._hosts = {}

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.args.config)
        return self._config

    def cluster_config(self) -> ClusterConfig:
        return self.config.cluster(self.args.pve_cluster)

    def connect(self) -> Tuple[PveApi, PveCluster]:
        cluster_cfg = self.cluster_config()
        if not cluster_cfg.verify_ssl:
            log.warning('[pve:%s] has verify_ssl=no: the API\'s certificate is not checked, so '
                        'whoever is on the way to %s can take its place and read the %s; pin '
                        'it with fingerprint= (a run without verify_ssl=no shows the line to '
                        'write)', cluster_cfg.name, cluster_cfg.host,
                        'token' if cluster_cfg.token_id else 'password')
        api = PveApi(cluster_cfg)
        return api, read_cluster(api, cluster_cfg.name)

    def selection(self) -> GuestSelection:
        args = self.args
        return GuestSelection(
            names=tuple(args.pve_guest), all=getattr(args, 'all', False),
            pools=tuple(getattr(args, 'pool', ())), tags=tuple(getattr(args, 'tag', ())),
            exclude=tuple(getattr(args, 'exclude', ())),
            templates=getattr(args, 'include_templates', False))

    def zfs_root(self) -> str:
        root = self.args.sync_zfs_root
        if not root:
            raise UsageError('{} needs --sync-zfs-root DEST (for example '
                             'tank/enc)'.format(self.args.command))
        if re.search(r'[@#:\s]', root) or root.startswith('/'):
            raise UsageError('--sync-zfs-root takes a dataset, like tank/enc, '
                             'not {!r}'.format(root))
        return root.rstrip('/')

    def retention(self) -> Tuple[Optional[int], Tuple]:
        """(keep_source, keep_destination): the options, else the config's
        for a cluster's guests, else the defaults."""
        args = self.args
        config = (self.cluster_config() if args.command in GUEST_SYNC_COMMANDS
                  else ClusterConfig(name='', host=''))
        return (getattr(args, 'keep_source', config.keep_source),
                getattr(args, 'keep_destination', config.keep_destination))

    def volume_host(self, cluster: PveCluster, guest: PveGuest, volume: PveVolume):
        """The ssh host that reaches `volume` where `guest` is now."""
        address, settings = storage_target(
            self.config, self.cluster_config(), cluster, volume.storage, guest.node)
        return self.ssh_host(address, settings)

    def ssh_host(self, address: str, settings: SshSettings) -> SshHost:
        key = (address, settings)
        if key not in self._hosts:
            if self._control_dir is None:
                self._control_dir = tempfile.mkdtemp(prefix='planb-pvesync-ssh-')
            self._hosts[key] = SshHost(address, settings, self._control_dir)
        return self._hosts[key]

    def close(self):
        for host in self._hosts.values():
            host.close()
        if self._control_dir:
            shutil.rmtree(self._control_dir, ignore_errors=True)


def cmd_list_pve_hosts(session: Session) -> int:
    _, cluster = session.connect()
    if session.args.json:
        rows = [dict(cluster=cluster.name, node=n.name, online=n.online, ip=n.ip)
                for n in cluster.nodes.values()]
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print('\n'.join(format_hosts(cluster)))
    return EXIT_OK


def cmd_list_pve_filestores(session: Session) -> int:
    _, cluster = session.connect()
    rows = filestore_rows(session.config, session.cluster_config(), cluster)
    _print_listing(session.args, rows, format_filestores)
    return EXIT_OK


def cmd_list_pve_guests(session: Session) -> int:
    api, cluster = session.connect()
    guests = read_guest_volumes(api, cluster, select_guests(cluster, session.selection()))
    log.info('discovery: %d API calls', api.calls)
    rows = guest_rows(session.config, session.cluster_config(), cluster, guests)
    _print_listing(session.args, rows, format_guests)
    return EXIT_OK


def cmd_sync_pve_guest(session: Session) -> int:
    args = session.args
    selection = session.selection()
    if selection.empty:
        raise UsageError('sync-pve-guest needs the guests to sync: -g VMID|NAME, '
                         '--all, --pool POOL or --tag TAG')
    root = session.zfs_root()
    api, cluster = session.connect()
    guests = read_guest_volumes(api, cluster, select_guests(cluster, selection))
    log.info('discovery: %d API calls for %d guest(s)', api.calls, len(guests))
    unknown = ['{} ({}): volumes unknown: {}'.format(g.vmid, g.label, g.note)
               for g in guests if g.volumes is None]
    for problem in unknown:
        log.error('%s', problem)
    here = backup_host(root)
    rename_guest_backups(here, root, cluster.name,
                         [g for g in guests if g.volumes is not None], args.dry_run)
    jobs = []
    for guest in guests:
        config = config_to_keep(cluster.name, guest)
        jobs += [guest_job(root, cluster.name, guest, volume,
                           session.volume_host(cluster, guest, volume), config)
                 for volume in guest.volumes or () if volume.skip is None]
    freeze = guest_freezer(api, guests) if args.fsfreeze else None
    status = run_jobs(session, here, jobs, freeze)
    return EXIT_FAILED if unknown else status


def cmd_list_planb_filesets(session: Session) -> int:
    args = session.args
    api, cluster = session.connect()
    guests = read_guest_volumes(api, cluster, select_guests(cluster, session.selection()))
    config = ([] if args.config == DEFAULT_CONFIG else
              ['-f', os.path.abspath(os.path.expanduser(args.config))])
    command = ['planb-pvesync', *config, '-p', cluster.name, 'planb-transport']
    if args.sync_zfs_root:
        problems = planb_pool_problems(LocalHost(), session.zfs_root())
        if problems:
            raise UsageError('; '.join(problems))
    _print_listing(args, planb_fileset_rows(cluster, guests, command), format_planb_filesets)
    return EXIT_OK


def cmd_planb_transport(session: Session) -> int:
    """One guest, by vmid, into the PlanB fileset whose exec transport runs this."""
    args = session.args
    fileset = planb_fileset(os.environ)
    api, cluster = session.connect()
    found = [g for g in cluster.guests if g.vmid == args.vmid]
    if not found:
        raise UsageError('no guest with vmid {} in cluster {} (deleted, or the API user '
                         'lacks VM.Audit on it)'.format(args.vmid, cluster.name))
    guest, = read_guest_volumes(api, cluster, found)
    if guest.volumes is None:
        raise PvesyncError('guest {} ({}): volumes unknown: {}'.format(
            guest.vmid, guest.label, guest.note))
    nothing = nothing_to_back_up(guest)
    if nothing:
        raise PvesyncError('guest {} ({}) has {}'.format(guest.vmid, guest.label, nothing))
    config = config_to_keep(cluster.name, guest)
    jobs = [volume_job(planb_child(fileset, volume), cluster.name, guest, volume,
                       session.volume_host(cluster, guest, volume), config)
            for volume in guest.volumes if volume.skip is None]
    here = backup_host(fileset.dataset)
    prepare_planb_dataset(here, fileset, args.dry_run)
    take_planb_kept_snapshots(here, fileset, args.dry_run)
    freeze = guest_freezer(api, [guest]) if args.fsfreeze else None
    return run_jobs(session, here, jobs, freeze,
                    planb_sync_options(fileset, sync_options(session)))


def config_to_keep(cluster: str, guest: PveGuest) -> Optional[str]:
    """kept_config, saying so when it does not fit in a ZFS property."""
    config = kept_config(cluster, guest) if guest.config is not None else None
    if guest.config is not None and config is None:
        log.warning('%s (%s): its config is too large to keep with the backup (over '
                    '%d bytes); its disks are backed up', guest.vmid, guest.label,
                    MAX_PROPERTY_VALUE)
    return config


def rename_guest_backups(here, root, cluster, guests, dry_run):
    """Follow guests renamed in PVE: their backups move to the new name."""
    found = list_datasets(here, [root], depth=2)
    if root not in found:
        raise UsageError('--sync-zfs-root {0} does not exist here; create it, for '
                         'example: zfs create -o mountpoint=none {0}'.format(root))
    for old, new, guest in guest_renames(found, root, cluster, guests):
        if dry_run:
            print('would rename {} to {} (guest {} is called {} now)'.format(
                old, new, guest.vmid, guest.label))
            continue
        here.run(here.zfs('rename', old, new))
        log.warning('renamed %s to %s: guest %s is called %s now',
                    old, new, guest.vmid, guest.label)


def guest_job(root: str, cluster: str, guest: PveGuest, volume: PveVolume,
              host, config: Optional[str] = None) -> SyncJob:
    """DEST/GUEST/STORAGE--VOLUME, recording where it came from."""
    return volume_job('{}/{}/{}--{}'.format(root, guest.label, volume.storage, volume.name),
                      cluster, guest, volume, host, config)


def volume_job(dst: str, cluster: str, guest: PveGuest, volume: PveVolume,
               host, config: Optional[str] = None) -> SyncJob:
    """`volume` into `dst`, recording where it came from and keeping the
    guest's `config` (kept_config) with each snapshot it brings; a guest's
    volumes are snapshotted at once."""
    props = (('cluster', cluster), ('node', guest.node), ('storage', volume.storage),
             ('volume', volume.volume), ('vmid', str(guest.vmid)))
    return SyncJob(src_host=host, src=volume.dataset, dst=dst, group=str(guest.vmid),
                   props=props, snapshot_props=(('config', config),) if config else ())


def guest_renames(found: Dict[str, Dataset], root: str, cluster: str,
                  guests: Sequence[PveGuest]) -> List[Tuple[str, str, PveGuest]]:
    """(old, new, guest) for each guest whose backups are under another name:
    ROOT/OLD holds only volumes recorded with the guest's vmid, and ROOT/NEW
    does not exist yet."""
    owners = {}     # ROOT/GUEST -> {(cluster, vmid)} of the volumes in it
    for dataset in found.values():
        parent = dataset.name.rpartition('/')[0]
        if parent.rpartition('/')[0] == root:
            owners.setdefault(parent, set()).add(
                (dataset.recorded.get('cluster'), dataset.recorded.get('vmid')))
    renames = []
    for guest in guests:
        new = '{}/{}'.format(root, guest.label)
        old = [p for p, who in owners.items() if who == {(cluster, str(guest.vmid))}]
        if new not in found and new not in owners and len(old) == 1:
            renames.append((old[0], new, guest))
    return renames


def cmd_status(session: Session) -> int:
    """The newest backup of each selected guest's volumes, judged by age."""
    args = session.args
    selection = session.selection()
    if selection.empty:
        selection = dataclasses.replace(selection, all=True)
    root = session.zfs_root()
    api, cluster = session.connect()
    guests = read_guest_volumes(api, cluster, select_guests(cluster, selection))
    found = list_datasets(backup_host(root), [root], depth=3)
    jobs, notes = [], {}
    for guest in guests:
        if guest.volumes is None:   # its node is offline: what the backup holds
            origin = {'cluster': cluster.name, 'vmid': str(guest.vmid)}
            for dataset in found.values():
                if origin.items() <= dataset.recorded.items():
                    jobs.append(SyncJob(None, '', dataset.name, group=str(guest.vmid)))
                    notes[dataset.name] = 'source unknown: ' + guest.note
        jobs += [guest_job(root, cluster.name, guest, volume,
                           session.volume_host(cluster, guest, volume))
                 for volume in guest.volumes or () if volume.skip is None]
    sources = read_sources(jobs, notes)
    labels = {str(g.vmid): g.label for g in guests}
    now = time.time()
    rows = [backup_status(int(job.group), labels[job.group], job.dst, found.get(job.dst),
                          sources.get(job.dst), now, _seconds(args.warn_age),
                          _seconds(args.max_age), notes.get(job.dst, ''))
            for job in jobs]
    if args.prometheus_file:
        write_atomically(args.prometheus_file, prometheus_text(cluster.name, rows, now))
    if args.json:
        print(json.dumps([status_row(r) for r in rows], indent=2, sort_keys=True))
    else:
        print('\n'.join(format_status(rows, now)[:1 if args.quiet else None]))
    if args.max_age is None and args.warn_age is None:
        return EXIT_OK
    return NAGIOS_EXIT[overall_state(rows)]


def _seconds(hours: Optional[float]) -> Optional[float]:
    return None if hours is None else hours * 3600


def read_sources(jobs: Sequence[SyncJob], notes: Dict[str, str]) -> Dict[str, Dataset]:
    """The jobs' sources by destination, one zfs list per source host, all at
    once; a host that cannot be listed leaves a note for each of its jobs."""
    sources = {}

    def read(host, host_jobs):
        try:
            listed = list_datasets(host, sorted({j.src for j in host_jobs}))
        except (CommandError, BadAnswer) as exc:
            notes.update((j.dst, 'source unknown: {}'.format(exc)) for j in host_jobs)
            return
        sources.update((j.dst, listed[j.src]) for j in host_jobs if j.src in listed)
    each_host([job for job in jobs if job.src_host is not None], read)
    return sources


def guest_freezer(api: PveApi, guests: Sequence[PveGuest]):
    """A context manager per guest that freezes its filesystems through the
    guest agent, where it runs one, and always thaws them again."""
    by_group = {str(g.vmid): g for g in guests}

    @contextlib.contextmanager
    def freeze(group):
        guest = by_group[group]
        if guest.type != 'qemu' or guest.status != 'running' or not guest.agent:
            log.info('%s: no fsfreeze (not a running VM with the guest agent)', guest.label)
            yield
            return
        path = 'nodes/{}/qemu/{}/agent/'.format(guest.node, guest.vmid)
        try:
            api.post(path + 'fsfreeze-freeze')
        except PveError:
            # Only its answer may have been lost: thaw, which does no harm
            # when nothing is frozen.
            with contextlib.suppress(PveError):
                api.post(path + 'fsfreeze-thaw')
            raise
        try:
            yield
        finally:
            api.post(path + 'fsfreeze-thaw')
    return freeze


def cmd_sync_filesystem(session: Session) -> int:
    args = session.args
    address, at, src = args.src.rpartition(':')
    if not src or '@' in src:
        raise UsageError('SRC must be [USER@]HOST:POOL/DATASET or POOL/DATASET, '
                         'not {!r}'.format(args.src))
    if address:
        user, _, host = address.rpartition('@')
        src_host = session.ssh_host(host, SshSettings(user=user or None))
    else:
        src_host = LocalHost()
    if '@' in args.dst or ':' in args.dst or '/' not in args.dst:
        raise UsageError('DST must be a local dataset below a pool, like tank/enc/name')
    job = SyncJob(src_host=src_host, src=src, dst=args.dst,
                  props=(('source', args.src),))
    return run_jobs(session, backup_host(args.dst), [job], None)


def transfer_options(args) -> TransferOptions:
    """The options of _add_transfer_options, as the pipeline takes them."""
    return TransferOptions(compress=args.compress, mbuffer=args.mbuffer,
                           progress=args.progress, bwlimit=args.bwlimit)


def sync_options(session: Session) -> SyncOptions:
    args = session.args
    keep_source, keep_destination = session.retention()
    return SyncOptions(
        transfer=transfer_options(args),
        snapshot_prefix=args.snapshot_prefix, make_snapshot=not args.no_snapshot,
        snapshot_reuse_age=args.snapshot_reuse_age,
        intermediates=not args.no_intermediates, rollback=args.rollback,
        destroy_diverged=args.destroy_diverged, dry_run=args.dry_run,
        wait=args.wait, lock_dir=args.lock_dir, jobs=getattr(args, 'jobs', 1),
        jobs_per_node=getattr(args, 'jobs_per_node', 1), keep_source=keep_source,
        keep_destination=keep_destination, thin_foreign=args.thin_foreign_snapshots)


def run_jobs(session: Session, here: LocalHost, jobs: Sequence[SyncJob], freeze,
             opts: Optional[SyncOptions] = None) -> int:
    """Sync `jobs` into `here` with `opts` (default: the command line's),
    then print the results; exit 1 when one failed."""
    args = session.args
    started = time.monotonic()
    results = SyncRun(jobs, here, opts or sync_options(session), freeze=freeze).run()
    for result in results:
        if result.status == 'failed':
            log.error('%s', format_result(result))
        elif result.status == 'skipped':
            log.warning('%s', format_result(result))
        elif not args.quiet and not args.dry_run and not args.json:
            print(format_result(result))
            for name in result.destroyed:
                print('  destroyed ' + name)
    if args.json:
        print(json.dumps([result_row(r) for r in results], indent=2, sort_keys=True))
    else:
        print(format_summary(args.command, results, time.monotonic() - started))
    return EXIT_FAILED if any(r.status == 'failed' for r in results) else EXIT_OK


def result_row(result: JobResult) -> dict:
    job = result.job
    return dict(dataset=job.dst, source_host=job.src_host.name, source=job.src,
                status=result.status, detail=result.detail, bytes=result.sent,
                started=iso_time(result.started) if result.started else None,
                finished=iso_time(result.started + result.seconds) if result.started else None,
                seconds=round(result.seconds, 3), destroyed=list(result.destroyed))


def iso_time(epoch: float) -> str:
    """UTC, to the millisecond: 2026-11-26T03:00:00.123Z."""
    return '{}.{:03d}Z'.format(time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(epoch)),
                               int(epoch * 1000) % 1000)


def _guest_word(session: Session) -> str:
    names = session.args.pve_guest
    if len(names) != 1:
        raise UsageError('{} needs exactly one guest: -g VMID|NAME'.format(session.args.command))
    return names[0]


def read_guest_backup(session: Session, delegated=True) -> Tuple[LocalHost, str, GuestBackup,
                                                                  List[RestorePoint]]:
    """The backups of the -g guest and their restore points, from this host
    alone: no API call, so that it works while the cluster is down. Not
    `delegated`: with sudo (or as root), whatever zfs allow grants."""
    root = session.zfs_root()
    here = backup_host(root) if delegated else LocalHost()
    found = list_datasets(here, [root], depth=3)
    if root not in found:
        raise UsageError('--sync-zfs-root {} does not exist here'.format(root))
    backup = find_guest_backup(found, root, session.cluster_config().name,
                               _guest_word(session))
    return here, root, backup, restore_points(backup, read_kept_configs(here, backup))


def cmd_list_restore_points(session: Session) -> int:
    _, _, backup, points = read_guest_backup(session)
    keys = _volume_keys(backup, points)
    rows = [dict(name=p.name, created=iso_time(p.created), config=p.config is not None,
                 volumes=list(p.volumes)) for p in points]
    if session.args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return EXIT_OK
    print('{} (vmid {}): {} volume(s), {} restore point(s)'.format(
        backup.label, backup.vmid, len(backup.volumes), len(points)))
    table = [('RESTORE POINT', 'CREATED (UTC)', 'CONFIG', 'VOLUMES')]
    table += [(p.name, time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(p.created)),
               'yes' if p.config else 'no',
               ' '.join(keys.get(v, v.rsplit('/', 1)[-1]) for v in p.volumes))
              for p in points]
    print('\n'.join(format_table(table)))
    return EXIT_OK


def _volume_keys(backup, points) -> Dict[str, str]:
    """dataset -> its config key (scsi0, rootfs), from the newest kept config."""
    newest = next((p.config for p in reversed(points) if p.config), None)
    if newest is None:
        return {}
    return {dataset.name: key
            for key, dataset, _, _ in kept_volumes(parse_kept_config(newest), backup)[0]}


@dataclasses.dataclass
class GuestRestore:
    """A restore, planned and checked: what goes where, and as what."""
    backup: GuestBackup
    point: RestorePoint
    kept: Optional[dict]            # the kept config; None: disks only
    node: str
    vmid: int
    host: object                    # the SshHost that reaches the node's storage
    volumes: List[VolumeRestore]
    states: Dict[str, str]          # restore_states, by target dataset
    config: dict                    # the guest's new config
    notes: List[str]                # what was left out or changed
    template: Optional[str] = None  # the storage for the empty container template

    @property
    def kind(self) -> str:
        return self.kept['type'] if self.kept else 'disks of'


def cmd_restore_pve_guest(session: Session) -> int:
    """A guest back from a restore point: its disks pushed to a node as PVE
    names them for its vmid, then the guest defined from its kept config."""
    args = session.args
    started = time.monotonic()
    api, here, plan = _plan_guest_restore(session)
    print('{} {} (vmid {}) from @{} ({} UTC) to {} as {} {}'.format(
        'would restore' if args.dry_run else 'restoring', plan.backup.label,
        plan.backup.vmid, plan.point.name,
        time.strftime('%Y-%m-%d %H:%M', time.gmtime(plan.point.created)), plan.node,
        plan.kind, plan.vmid))
    for note in plan.notes:
        print('  ' + note)
    results = _restore_volumes(session, here, plan)
    failed = [r for r in results if r.status == 'failed']
    for result in failed:
        log.error('%s; run the same command again to resume', format_result(result))
    if args.dry_run:
        _show_restore(plan)
    elif not failed:
        _define_guest(api, args, plan)
    print('restore-pve-guest: {} ({}) @{} -> {} as {} {}: {} volume(s), {} in {:.1f} s{}'.format(
        plan.backup.label, plan.backup.vmid, plan.point.name, plan.node, plan.kind, plan.vmid,
        len(plan.volumes), format_bytes(sum(r.sent for r in results)),
        time.monotonic() - started, ', FAILED' if failed else ''))
    return EXIT_FAILED if failed else EXIT_OK


def _plan_guest_restore(session: Session) -> Tuple[PveApi, LocalHost, GuestRestore]:
    """Everything a restore needs to know and check before it sends anything."""
    args = session.args
    here, _, backup, points = read_guest_backup(session)
    point = choose_restore_point(points, args.at, backup.label)
    kept = parse_kept_config(point.config) if point.config else None
    if kept is None and not args.disks_only:
        raise UsageError('restore point @{} of {} has no kept config (it was made before '
                         'planb-pvesync kept them); restore its disks with --disks-only and '
                         'define the guest by hand'.format(point.name, backup.label))
    api, cluster = session.connect()
    node = _restore_node(cluster, args.node, kept, backup)
    vmid = _restore_vmid(api, cluster, args.vmid, backup.vmid, args.disks_only)
    volumes, dropped = plan_restore(kept, backup, point, vmid, cluster.storages, node,
                                    args.storage, args.volume)
    host = _restore_host(session, cluster, volumes, node)
    volumes, states = _check_targets(host, here, volumes, point.name, args.disks_only)
    plan = GuestRestore(backup, point, None if args.disks_only else kept, node, vmid, host,
                        volumes, states, {}, ['{}: left out ({})'.format(key, why)
                                              for key, why in dropped.items()])
    if plan.kept:
        plan.config, plan.notes = restored_config(kept, volumes, dropped, args.keep_macs)
        if plan.kind == 'lxc':
            plan.template = template_storage(cluster, node, args.template_storage)
        check_privileges(api, restore_privileges(
            plan.kind, vmid, plan.config, {v.storage for v in volumes}, plan.template,
            args.start))
    return api, here, plan


def _restore_node(cluster: PveCluster, wanted: Optional[str], kept: Optional[dict],
                  backup: GuestBackup) -> str:
    name = wanted or (kept or {}).get('node') or backup.volumes[0].recorded.get('node')
    node = cluster.nodes.get(name)
    if node is None or not node.online:
        online = ', '.join(n.name for n in cluster.nodes.values() if n.online)
        raise UsageError('node {} is {}; choose one with --node ({})'.format(
            name, 'offline' if node else 'not in cluster ' + cluster.name, online))
    return name


def _restore_vmid(api: PveApi, cluster: PveCluster, wanted: Optional[int], original: int,
                  disks_only: bool) -> int:
    """--vmid, else the guest's own vmid when free, else the cluster's next
    free one. Only --disks-only goes to a vmid in use (a disk for it)."""
    taken = {g.vmid: g for g in cluster.guests}
    if wanted is None:
        wanted = original if original not in taken or disks_only else int(
            api.get('cluster/nextid'))
    if wanted in taken and not disks_only:
        guest = taken[wanted]
        raise UsageError('vmid {} is taken ({} on {}); choose a free one with --vmid, or '
                         'leave it out to take the next free one'.format(
                             wanted, guest.label, guest.node))
    return wanted


def _restore_host(session: Session, cluster: PveCluster, volumes, node: str) -> SshHost:
    targets = {storage_target(session.config, session.cluster_config(), cluster,
                              v.storage, node) for v in volumes}
    if len(targets) > 1:
        raise UsageError('the target storages on {} are reached by different ssh targets; '
                         'restore their volumes one by one with --volume'.format(node))
    return session.ssh_host(*targets.pop())


def _check_targets(host, here, volumes, point, disks_only):
    """(volumes, states): what each target needs (restore_states), before
    anything is sent. A dataset that is there already and is not this restore
    stops it; with --disks-only the volume takes the next disk number that is
    free or holds this very restore (restore_states), so that it resumes."""
    pools = sorted({v.dataset.rpartition('/')[0] for v in volumes})
    existing = list_datasets(host, pools, depth=2)
    for pool in pools:
        if pool not in existing:
            raise UsageError('{} has no dataset {}; check the storage in PVE'.format(
                host.name, pool))
    chosen, states = [], {}
    for volume in volumes:
        state = _target_state(here, volume, point, existing)
        while state == 'exists' and disks_only:
            name = next_free_name(volume.volume, {volume.volume} | {v.volume for v in chosen})
            volume = dataclasses.replace(volume, volume=name, dataset='{}/{}'.format(
                volume.dataset.rpartition('/')[0], name))
            state = _target_state(here, volume, point, existing)
        if state == 'exists':
            raise UsageError('{} already has {}; nothing was sent: restore as another --vmid, '
                             'to another --storage, or remove it'.format(host.name, volume.dataset))
        chosen.append(volume)
        states[volume.dataset] = state
    return chosen, states


def _target_state(here, volume, point, existing) -> str:
    state = restore_states([volume], point, existing)[volume.dataset]
    if state == 'resume':   # a partial receive: resumed only when it is of this backup
        sends = read_resume_token(here, existing[volume.dataset].resume_token)
        if sends is None or not sends.is_of(volume.backup):
            return 'exists'
    return state


def _restore_volumes(session, here, plan: GuestRestore) -> List[JobResult]:
    """Every volume not restored yet, with the machinery of a backup run the
    other way: a send here, a resumable receive on the node."""
    args = session.args
    jobs = [SyncJob(src_host=here, src=v.backup.name, dst=v.dataset, until=plan.point.name,
                    receive_props=tuple(sorted({
                        PROPERTY_PREFIX + 'restored-from': restore_mark(v, plan.point.name),
                        **(subvolume_props(v.options) if v.backup.type == 'filesystem'
                           else {})}.items())),
                    mount=v.backup.type == 'filesystem',
                    raw=v.backup.encryption_root == v.backup.name)
            for v in plan.volumes if plan.states[v.dataset] != 'done']
    for volume in plan.volumes:
        if plan.states[volume.dataset] == 'done':
            print('{}: restored already'.format(volume.dataset))
    opts = SyncOptions(
        transfer=transfer_options(args),
        make_snapshot=False, intermediates=False, keep_source=None, bookmarks=False,
        dry_run=args.dry_run, lock_dir=args.lock_dir)
    results = SyncRun(jobs, plan.host, opts, out=print).run() if jobs else []
    for result in results:
        if result.status == 'synced':
            print(format_result(result))
    return results


def _show_restore(plan: GuestRestore):
    if plan.kept is None:
        return
    print('would create {} {} on {} with:'.format(plan.kind, plan.vmid, plan.node))
    for key, value in sorted(plan.config.items(), key=lambda kv: _natural_key(kv[0])):
        print('  {}: {}'.format(key, value))


def _define_guest(api, args, plan: GuestRestore):
    if plan.kept is None:
        print('restored the disks as {}; attach them with qm set or pct set'.format(
            ', '.join(v.volid for v in plan.volumes)))
        return
    template = empty_template(api, plan.node, plan.template) if plan.template else None
    create_guest(api, plan.node, plan.kind, plan.vmid, plan.config, template)
    if args.start:
        api.wait(plan.node, api.post('nodes/{}/{}/{}/status/start'.format(
            plan.node, plan.kind, plan.vmid)))
    config = plan.config
    print('created {} {} ({}) on {}, {}; {}'.format(
        plan.kind, plan.vmid, config.get('name') or config.get('hostname') or plan.vmid,
        plan.node, 'started' if args.start else 'not started (--start starts it)',
        'MAC addresses as they were' if args.keep_macs else
        'new MAC addresses (--keep-macs keeps them)'))


def cmd_mount_restore_point(session: Session) -> int:
    """A restore point's volume readable here, read-only, from a clone: the
    backup itself is not touched. Nothing in it runs as another user, nor as
    a program or a device (nosuid, noexec, nodev; the clone has setuid, exec
    and devices off), and it is mounted inside PATH, which only the user who
    mounted it may enter: the guest's owners and modes mean nothing here."""
    args = session.args
    here, root, backup, points = read_guest_backup(session, delegated=False)    # it mounts
    point = choose_restore_point(points, args.at, backup.label)
    volume = _volume_to_mount(backup, points, point, args.volume)
    path = os.path.abspath(args.path)
    if os.path.ismount(path) or (os.path.isdir(path) and os.listdir(path)):
        raise UsageError('{} is in use (a mount point, or not empty); choose an empty '
                         'directory'.format(path))
    if volume.type == 'volume' and os.geteuid() != 0:
        raise UsageError('mounting a partition of a VM disk needs root (mount): run it as '
                         'root, for example with sudo')
    if planb_rotates(here, volume.name, point.name):
        log.warning('PlanB rotates @%s: while it is mounted its rotation cannot destroy it (a '
                    'clone depends on it), and that run reads as failed in PlanB, though its '
                    'backup is made; unmount it as soon as you are done', point.name)
    clone = restore_clone_name(root, backup, volume, point.name)
    parent = clone.rpartition('/')[0]
    found = list_datasets(here, [parent, clone])
    if clone in found:
        raise UsageError('@{} of {} is mounted already: see zfs get {} {}'.format(
            point.name, volume.name, MOUNTED_AT, clone))
    if parent not in found:
        here.run(here.zfs('create', '-o', 'mountpoint=none', parent))
    _private_directory(path)
    inside = os.path.join(path, _volume_keys(backup, points).get(
        volume.name, volume.name.rsplit('/', 1)[-1]))
    origin = '{}@{}'.format(volume.name, point.name)
    # A volume has no setuid, exec or devices: its partition is mounted with
    # nosuid,nodev,noexec instead (_mount_partition).
    harmless = ['-o', 'readonly=on', '-o', '{}={}'.format(MOUNTED_AT, inside)]
    if volume.type == 'filesystem':
        here.run(here.zfs('clone', *harmless, '-o', 'setuid=off', '-o', 'exec=off',
                          '-o', 'devices=off', '-o', 'mountpoint=' + inside, origin, clone))
        what = 'its file system'
    else:
        here.run(here.zfs('clone', *harmless, '-o', 'volmode=full', origin, clone))
        try:
            what = _mount_partition(here, clone, inside, args.partition, volume.name)
        except BaseException:
            here.run(here.zfs('destroy', clone))
            raise
    print('mounted {} of {} @{} read-only at {} (in {}, which only you may enter); when '
          'done: planb-pvesync unmount-restore-point --sync-zfs-root {} {}'.format(
              what, volume.name, point.name, inside, path, root, shlex.quote(path)))
    return EXIT_OK


def _private_directory(path: str):
    """`path` as a directory that only this user may enter, made if new."""
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid():
        raise UsageError('{} is not a directory of your own; choose another PATH'.format(path))
    os.chmod(path, 0o700)


def _volume_to_mount(backup, points, point, wanted) -> Dataset:
    have = [v for v in backup.volumes if v.name in point.volumes]
    keys = _volume_keys(backup, points)
    if wanted:
        found = [v for v in have if wanted in (keys.get(v.name), v.name.rsplit('/', 1)[-1],
                                               v.recorded.get('volume', '').rsplit('/', 1)[-1])]
    elif len(have) == 1:
        found = have
    else:   # the boot disk, as the kept config tells
        boot = ['rootfs'] + _boot_order(parse_kept_config(point.config)['config']) \
            if point.config else []
        found = [v for key in boot for v in have if keys.get(v.name) == key][:1]
    if not found:
        raise UsageError('choose the volume of {} @{} with --volume: {}'.format(
            backup.label, point.name, ', '.join(
                keys.get(v.name) or v.name.rsplit('/', 1)[-1] for v in have)))
    return found[0]


def _mount_partition(here, clone, path, number, what) -> str:
    """Mount one partition of the zvol clone; returns what was mounted."""
    device = '/dev/zvol/' + clone
    here.run(['udevadm', 'settle'])
    deadline = time.monotonic() + 30
    while not os.path.exists(device) and time.monotonic() < deadline:
        time.sleep(0.2)
    partition, fs = choose_partition(partitions(device), number, what)
    os.makedirs(path, exist_ok=True)
    here.run(['mount', '-t', fs, '-o', MOUNT_OPTIONS[fs] + ',nosuid,nodev,noexec',
              partition, path])
    number = _partition_number(partition)
    return '{} {}'.format('partition {}'.format(number) if number else 'the disk', fs)


def cmd_unmount_restore_point(session: Session) -> int:
    args = session.args
    here, root = LocalHost(), session.zfs_root()
    clones = '{}/{}'.format(root, RESTORE_CLONES)
    try:
        out = here.run(here.zfs('list', '-H', '-o', 'name,type,' + MOUNTED_AT, '-d', '1',
                                '-t', 'filesystem,volume', clones))
    except CommandError:
        out = ''
    mounted = [line.split('\t') for line in out.splitlines()[1:]]
    path = os.path.abspath(args.path) if args.path else None
    chosen = [m for m in mounted if args.all or path in (m[2], os.path.dirname(m[2]))]
    if not chosen:
        raise UsageError('no restore point of planb-pvesync is mounted {}; see: zfs list -r '
                         '-o name,{} {}'.format('at ' + path if path else 'here', MOUNTED_AT,
                                                clones))
    for clone, kind, where in chosen:
        try:
            if kind == 'volume' and os.path.ismount(where):
                here.run(['umount', where])
            here.run(here.zfs('destroy', clone))
        except CommandError as exc:
            if 'busy' in str(exc):
                raise PvesyncError('{} is in use (a shell in it, an open file): leave it, '
                                   'then run this again'.format(where))
            raise
        for directory in (where, os.path.dirname(where)):   # the mount's, then PATH
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        print('unmounted {} (destroyed the clone {})'.format(where, clone))
    return EXIT_OK


# The options that may stand before the command, as in the origin: on the main
# parser with their defaults, and on each command that takes them without
# (argparse.SUPPRESS), so that one given before the command is not reset.
def _default(value, suppress):
    return argparse.SUPPRESS if suppress else value


def _add_config_options(parser, suppress=True):
    parser.add_argument('-f', '--config', metavar='FILENAME',
                        default=_default(DEFAULT_CONFIG, suppress),
                        help='the config file (default: {})'.format(DEFAULT_CONFIG))
    parser.add_argument('-p', '--pve-cluster', metavar='CLUSTERNAME',
                        default=_default(None, suppress),
                        help='the [pve:CLUSTERNAME] section to use (optional when '
                             'there is one)')


def _add_guest_option(parser, suppress=True):
    parser.add_argument('-g', '--pve-guest', metavar='GUESTNAME', action='append',
                        default=_default([], suppress),
                        help='a guest by vmid or name; repeatable' if suppress else
                             'a guest by vmid or name, for the commands that take one; '
                             'repeatable')


def _add_root_option(parser, suppress=True):
    parser.add_argument('--sync-zfs-root', metavar='DEST_FILESYSTEM',
                        default=_default(None, suppress),
                        help='the local dataset that holds the backups, e.g. tank/enc')


def _add_verbose_options(parser, suppress=True):
    parser.add_argument('-v', '--verbose', action='count', default=_default(0, suppress),
                        help='say more: -v what happens, -vv every API call and command')
    parser.add_argument('--debug', action='store_const', const=2, dest='verbose',
                        default=_default(0, suppress), help='the same as -vv')


def _add_quiet_option(parser, suppress=True):
    parser.add_argument('-q', '--quiet', action='store_true', default=_default(False, suppress),
                        help='print only the summary and what failed')


def _add_json_option(parser):
    parser.add_argument('--json', action='store_true', help='print JSON')


def _add_transfer_options(parser):
    parser.add_argument('-n', '--dry-run', action='store_true',
                        help='print the plan and the exact pipelines; change nothing')
    parser.add_argument('--compress', choices=sorted(COMPRESSORS), default='zstd',
                        help='compression on the wire (default: %(default)s)')
    parser.add_argument('--mbuffer', metavar='SIZE', type=_option_type(parse_mbuffer_size),
                        help='buffer the stream where it is received with mbuffer, '
                             'e.g. 256M')
    parser.add_argument('--bwlimit', metavar='RATE', type=_option_type(parse_bwlimit),
                        help='limit the transfer to RATE bytes per second, e.g. 50M '
                             '(with pv)')
    parser.add_argument('--progress', action=argparse.BooleanOptionalAction,
                        default=sys.stderr.isatty(),
                        help='show pv progress (default: when stderr is a terminal)')
    parser.add_argument('--lock-dir', metavar='DIR',
                        help='where the per-dataset locks live, a directory of yours '
                             'with mode 0700 (default: /run/lock/planb-pvesync-UID)')


def _add_sync_options(parser, planb=False):
    """The sync options; for planb-transport without those PlanB decides."""
    _add_transfer_options(parser)
    parser.add_argument('--no-intermediates', action='store_true',
                        help='send only the newest snapshot (zfs send -i, not -I)')
    parser.add_argument('--rollback', action='store_true',
                        help='roll a changed destination back to the newest common '
                             'snapshot, destroying what came after it there (by hand, '
                             'never from cron)')
    parser.add_argument('--destroy-diverged', action='store_true',
                        help='destroy a destination that shares no snapshot with '
                             'its source, and copy it anew (by hand, never from cron)')
    parser.add_argument('--keep-source', metavar='N|all', default=argparse.SUPPRESS,
                        type=_option_type(parse_keep_source),
                        help="keep the newest N of this tool's snapshots on the "
                             'source, and always the newest one the backup has '
                             '(default: keep_source= in the config, else {})'.format(
                                 DEFAULT_KEEP_SOURCE))
    parser.add_argument('--json', action='store_true',
                        help='print the results as JSON instead of lines')
    if planb:
        parser.set_defaults(**dict.fromkeys(PLANB_DECIDED_OPTIONS))
    else:
        _add_options_planb_decides(parser)


def _add_planb_sync_options(parser):
    _add_sync_options(parser, planb=True)


def _add_jobs_options(parser):
    parser.add_argument('-j', '--jobs', type=_positive_int, default=1, metavar='N',
                        help='transfers at once, in all (default: %(default)s)')
    parser.add_argument('--jobs-per-node', type=_positive_int, default=1, metavar='N',
                        help='transfers at once from one source node (default: '
                             '%(default)s: its disks and link are the limit)')


def _add_fsfreeze_option(parser):
    parser.add_argument('--fsfreeze', action='store_true',
                        help='freeze the guest filesystems through the QEMU '
                             'guest agent around the snapshot')


# What planb-transport takes from PlanB (planb_sync_options), not from options.
PLANB_DECIDED_OPTIONS = ('snapshot_prefix', 'no_snapshot', 'snapshot_reuse_age', 'wait',
                         'thin_foreign_snapshots')


def _add_options_planb_decides(parser):
    parser.add_argument('--snapshot-prefix', default='planb', metavar='PREFIX',
                        type=_option_type(parse_snapshot_prefix),
                        help='name of the snapshots this tool makes: '
                             'PREFIX-YYYYMMDDTHHMMSSZ (default: %(default)s)')
    parser.add_argument('--no-snapshot', action='store_true',
                        help='make no snapshot; send what the source has')
    parser.add_argument('--snapshot-reuse-age', type=int, default=0, metavar='SECONDS',
                        help='make no snapshot when the source has one younger '
                             'than this (default: %(default)s, always make one)')
    parser.add_argument('--wait', action='store_true',
                        help='wait for another run that holds a volume, instead '
                             'of skipping it')
    parser.add_argument('--keep-destination', metavar='SCHEDULE|all',
                        default=argparse.SUPPRESS, type=_option_type(parse_keep_destination),
                        help="thin this tool's snapshots on the backup host, e.g. "
                             'all:2d,daily:2w,weekly:3m,monthly:1y (default: '
                             'keep_destination= in the config, else all)')
    parser.add_argument('--thin-foreign-snapshots', action='store_true',
                        help='let --keep-destination also destroy snapshots this '
                             'tool did not make')


def _add_status_options(parser):
    parser.add_argument('--max-age', type=float, metavar='HOURS',
                        help='critical (exit 2) when a backup is older than this '
                             'or missing; the exit status follows Nagios')
    parser.add_argument('--warn-age', type=float, metavar='HOURS',
                        help='warning (exit 1) when a backup is older than this')
    parser.add_argument('--prometheus-file', metavar='PATH',
                        help='also write the figures for the node exporter\'s '
                             'textfile collector, e.g. /var/lib/prometheus/'
                             'node-exporter/planb-pvesync.prom')


def _add_at_option(parser):
    parser.add_argument('--at', metavar='SNAPSHOT',
                        help='the restore point (default: the newest; '
                             'list-restore-points lists them)')


def _add_restore_options(parser):
    _add_transfer_options(parser)
    parser.add_argument('--volume', action='append', default=[], metavar='KEY|NAME',
                        help='only this volume, by config key (scsi0, rootfs, mp0) or '
                             'name (vm-106-disk-0); repeatable')
    parser.add_argument('--node', help='the node to restore to (default: where it was)')
    parser.add_argument('--storage', help='the ZFS storage to restore to (default: where '
                                          'each volume was)')
    parser.add_argument('--vmid', type=_positive_int, help='the vmid to restore as '
                        "(default: its own when free, else the cluster's next free one)")
    parser.add_argument('--keep-macs', action='store_true',
                        help='keep the MAC addresses (default: new ones, so that the '
                             'copy can run beside the original)')
    parser.add_argument('--start', action='store_true', help='start the restored guest')
    parser.add_argument('--disks-only', action='store_true',
                        help='restore the disks and define no guest (a disk for a '
                             'guest that exists, or a backup without a kept config)')
    parser.add_argument('--template-storage', metavar='STORAGE',
                        help='where the empty container template goes (default: local, '
                             'or the first storage for templates on the node)')


def _add_mount_options(parser):
    parser.add_argument('--volume', metavar='KEY|NAME',
                        help='the volume, by config key (scsi0, rootfs, mp0) or name '
                             '(default: the boot disk)')
    parser.add_argument('--partition', type=int, metavar='N',
                        help='the partition of a VM disk to mount (default: the one '
                             'with a file system)')
    parser.add_argument('path', metavar='PATH', help='where to mount it (an empty '
                                                     'directory, or a new one)')


def _add_unmount_options(parser):
    parser.add_argument('path', metavar='PATH', nargs='?', help='where it is mounted')
    parser.add_argument('--all', action='store_true',
                        help='every restore point mounted under --sync-zfs-root')


def _add_vmid_argument(parser):
    parser.add_argument('vmid', metavar='VMID', type=_vmid,
                        help="the guest's vmid (not its name, which may change)")


def _add_filesystem_arguments(parser):
    parser.add_argument('src', metavar='SRC', help='[USER@]HOST:POOL/DATASET or '
                        'POOL/DATASET')
    parser.add_argument('dst', metavar='DST', help='the local dataset to receive into')


def _add_selection_options(parser):
    parser.add_argument('--all', action='store_true',
                        help='every guest of the cluster (templates only with '
                             '--include-templates)')
    parser.add_argument('--pool', action='append', default=[], metavar='POOL',
                        help='the guests in PVE pool POOL; repeatable')
    parser.add_argument('--tag', action='append', default=[], metavar='TAG',
                        help='the guests with PVE tag TAG; repeatable')
    parser.add_argument('--exclude', action='append', default=[], metavar='VMID|NAME',
                        help='leave this guest out; repeatable')
    parser.add_argument('--include-templates', action='store_true',
                        help='let --all, --pool and --tag pick templates too')


def _option_type(parse):
    """An argparse type from a parser that raises ValueError with a message."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc))
    return convert


def _vmid(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(
            "{!r} is no vmid; give the guest's number, not its name, so that a "
            'rename in PVE does not break the fileset'.format(text))
    return int(text)


def _positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError('{!r} is not a whole number of 1 or more'.format(text))
    return int(text)


@dataclasses.dataclass(frozen=True)
class Command:
    run: object                     # cmd_...(session) -> exit status
    summary: str
    synopsis: str                   # what its usage line shows after its name
    options: tuple                  # the functions that add its options


LISTING = (_add_config_options, _add_json_option)
GUESTS = (_add_config_options, _add_guest_option, _add_selection_options)
BACKUPS = (_add_config_options, _add_guest_option, _add_root_option)
SELECTION = '[-g VMID|NAME] [--all|--pool POOL|--tag TAG] [--exclude VMID|NAME]'
COMMANDS = {
    'list-pve-hosts': Command(cmd_list_pve_hosts, 'list the nodes of the cluster', '', LISTING),
    'list-pve-filestores': Command(cmd_list_pve_filestores, 'list the storages per node', '',
                                   LISTING),
    'list-pve-guests': Command(cmd_list_pve_guests, 'list the guests and their volumes',
                               SELECTION, GUESTS + (_add_json_option,)),
    'sync-pve-guest': Command(
        cmd_sync_pve_guest, "back up the guests' ZFS volumes",
        '-g VMID|NAME|--all|--pool POOL|--tag TAG --sync-zfs-root DEST',
        GUESTS + (_add_root_option, _add_quiet_option, _add_sync_options, _add_jobs_options,
                  _add_fsfreeze_option)),
    'status': Command(
        cmd_status, 'how old the newest backup of each volume is',
        '[-g VMID|NAME|--all|--pool POOL|--tag TAG] --sync-zfs-root DEST [--max-age HOURS] '
        '[--warn-age HOURS]',
        GUESTS + (_add_root_option, _add_quiet_option, _add_json_option, _add_status_options)),
    'sync-filesystem': Command(cmd_sync_filesystem, 'back up one dataset, without PVE',
                               'SRC DST',
                               (_add_quiet_option, _add_sync_options, _add_filesystem_arguments)),
    'list-planb-filesets': Command(
        cmd_list_planb_filesets, 'list the guests as PlanB filesets, with their '
        'transport_command', SELECTION + ' [--sync-zfs-root POOL]',
        GUESTS + (_add_root_option, _add_json_option)),
    'planb-transport': Command(
        cmd_planb_transport, "back up one guest as a PlanB fileset's exec transport", 'VMID',
        (_add_config_options, _add_quiet_option, _add_planb_sync_options, _add_jobs_options,
         _add_fsfreeze_option, _add_vmid_argument)),
    'list-restore-points': Command(cmd_list_restore_points, "a guest's restore points",
                                   '-g VMID|NAME --sync-zfs-root DEST',
                                   BACKUPS + (_add_json_option,)),
    'restore-pve-guest': Command(
        cmd_restore_pve_guest, 'bring a guest (or its disks) back from a restore point',
        '-g VMID|NAME --sync-zfs-root DEST [--at SNAPSHOT] [--node NODE] [--storage STORAGE] '
        '[--vmid VMID]', BACKUPS + (_add_at_option, _add_restore_options)),
    'mount-restore-point': Command(
        cmd_mount_restore_point, "mount a restore point's volume read-only here",
        '-g VMID|NAME --sync-zfs-root DEST [--at SNAPSHOT] [--volume KEY|NAME] [--partition N] '
        'PATH', BACKUPS + (_add_at_option, _add_mount_options)),
    'unmount-restore-point': Command(cmd_unmount_restore_point, 'undo mount-restore-point',
                                     '--sync-zfs-root DEST PATH|--all',
                                     (_add_root_option, _add_unmount_options)),
}
PRE_COMMAND_OPTIONS = (_add_config_options, _add_guest_option, _add_root_option,
                       _add_verbose_options, _add_quiet_option)


class _ArgumentParser(argparse.ArgumentParser):
    """A usage error is one line, like every other error. Each parser keeps
    what was added to it, for the man page (man/build.py) and for
    parse_command_line."""

    def __init__(self, *args, **kwargs):
        self.added = []             # its options, in order
        self.commands = {}          # name -> the parser of that command (build_parser)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.added.append(action)
        return action

    def error(self, message):
        self.exit(EXIT_USAGE, '{0}: error: {1} (see {0} --help)\n'.format(self.prog, message))


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog='planb-pvesync',
        description='Back up the ZFS volumes of Proxmox VE guests to this host. '
                    'COMMAND --help shows what each command takes; man planb-pvesync '
                    'tells the rest.')
    parser.add_argument('--version', action='version',
                        version='%(prog)s ' + __version__)
    for add in PRE_COMMAND_OPTIONS:
        add(parser, suppress=False)
    commands = parser.add_subparsers(dest='command', title='commands')
    for name, command in COMMANDS.items():
        sub = commands.add_parser(
            name, help=command.summary, description=command.summary,
            usage=' '.join(filter(None, ['%(prog)s', command.synopsis, '[OPTIONS]'])),
            aliases=['list-backups'] if name == 'status' else [])
        for add in command.options + (_add_verbose_options,):
            add(sub)
        sub.set_defaults(func=command.run, command_parser=sub)
        parser.commands[name] = sub
    return parser


def parse_command_line(parser: _ArgumentParser, argv=None):
    """parser.parse_args(argv), where an option of other commands is refused as
    such, before the command (planb-pvesync -g 106 list-pve-hosts) or after it."""
    args, extras = parser.parse_known_args(argv)
    sub = getattr(args, 'command_parser', None)
    if sub is not None:
        takes = {action.dest for action in sub.added}
        for action in parser.added:
            names = action.option_strings
            if action.dest in takes | {'help', 'version'}:
                continue
            if (getattr(args, action.dest) != action.default
                    or any(word.split('=', 1)[0] in names for word in extras)):
                sub.error('{} is not an option of {}'.format('/'.join(names), args.command))
    if extras:
        (sub or parser).error('unrecognized arguments: ' + ' '.join(extras))
    return args


class _LogFormatter(logging.Formatter):
    def format(self, record):
        level = '' if record.levelno < logging.WARNING else record.levelname.lower() + ': '
        text = 'planb-pvesync: {}{}'.format(level, record.getMessage())
        if record.exc_info:
            text += '\n' + self.formatException(record.exc_info)
        return text


def setup_logging(verbose: int, quiet: bool):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose
                 else logging.WARNING)


@contextlib.contextmanager
def handle_stop_signals():
    """SIGINT, SIGTERM and SIGHUP end every running pipeline and raise
    Stopped in the main thread: locks are released and ssh connections closed
    on the way out, and the exit status is 128 plus the signal's number."""
    RUNNING.stopped_by = None
    previous = {signum: signal.signal(signum, RUNNING.on_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_command_line(parser, argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        parser.error('give a command')
    setup_logging(args.verbose, args.quiet)
    session = Session(args)
    try:
        with handle_stop_signals():
            try:
                return args.func(session)
            finally:
                session.close()
    except PvesyncError as exc:
        log.error('%s', exc, exc_info=args.verbose >= 2)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = getattr(exc, 'signum', signal.SIGINT)
        log.error('stopped by %s; a transfer it cut short resumes on the next run',
                  signal.Signals(signum).name)
        return EXIT_STOPPED + signum
    except Exception as exc:     # a bug: still one line, unless asked for more
        log.error('internal error: %s: %s (--debug shows where)',
                  type(exc).__name__, exc, exc_info=args.verbose >= 2)
        return EXIT_FAILED


if __name__ == '__main__':
    sys.exit(main())
