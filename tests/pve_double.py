#!/usr/bin/env python3
"""A test double of the Proxmox VE REST API, standard library only.

It serves the calls planb-pvesync makes from a JSON fixture, the way pveproxy
does: same paths and field sets, the same privilege checks, errors with the
message in the HTTP status line, tickets, CSRF tokens and API tokens.

    python3 pve_double.py --fixture cluster.json [--bind ADDR] [--port N]
                          [--cert-dir DIR] [--latency SECONDS]
    with PveDouble('cluster.json') as pve: ... pve.url, pve.cert_file, pve.calls

Faults on demand, as a cluster under load shows them: pve.drop(N) handles the
next N requests but closes their connections without an answer; pve.hang()
leaves every request unanswered (and undone) until pve.answer(); pve.stop()
refuses connections, as a node whose pveproxy is down.

The fixture is read again whenever the file changes; replace it at once (see
write_fixture) so that no request reads half of it. Its keys:

  cluster   the cluster name; null for a standalone node (exactly one node)
  version   optional {"version", "release", "repoid"}, for GET /version
  nodes     [{"name", "ip", "status": "online" | "offline", optional figures
            "maxcpu", "cpu", "maxmem", "mem", "maxdisk", "disk", "uptime", "level"}];
            the first online node is the one answering, with this certificate
  users     [{"userid": "planb@pve", "password", "privileges": ["VM.Audit", ...],
              "tokens": [{"id": "sync", "secret", "privileges": [...]}]}];
            privileges hold on every path; root@pam has them all, as in PVE; a
            token has those it and its user both have (privilege separation)
  storage   storage.cfg as GET /storage shows it, without "digest"
  pools     optional {"poolid": {"comment": "..."}}; pools named by guests exist anyway
  guests    [{"vmid", "type": "qemu" | "lxc", "node", "status": "running" | "stopped",
              "config": {as GET .../config shows it, without "digest"},
              optional "pool", "hastate", "agent_running" (true), "filesystems" (1)}];
            name, tags, lock and template come from the config
  templates optional {"NODE/STORAGE": ["debian-12.tar.zst", ...]}: container
            templates on a storage with content vztmpl; uploads add to it

Creating guests (POST /nodes/{node}/qemu and /lxc, as a restore does) adds
them to the fixture file, as PVE adds a config file; their tasks end at once.
"""

import argparse
import dataclasses
import email.parser
import email.policy
import functools
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import zlib
from base64 import b64encode
from typing import Callable, NamedTuple, Optional

API_PREFIX = '/api2/json'
TICKET_LIFETIME = 7200
MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
SIZE_UNITS = {'': 1, 'K': 1 << 10, 'M': MiB, 'G': GiB, 'T': TiB}
CONFIG_DIRS = {'qemu': 'qemu-server', 'lxc': 'lxc'}
DEFAULT_VERSION = {'version': '9.1.3', 'release': '9.1', 'repoid': '3c1b2d97e0a5f468'}
NODE_FIGURES = {'maxcpu': 16, 'cpu': 0.04, 'maxmem': 64 * GiB, 'mem': 11 * GiB,
                'maxdisk': 100 * GiB, 'disk': 9 * GiB, 'uptime': 1_209_600}
STORAGE_SIZE = 2 * TiB
CERT_FILE, KEY_FILE = 'pve-double.pem', 'pve-double.key'

# PVE 9's privileges (PVE::AccessControl's privilege groups).
PRIVILEGES = frozenset('''
    Datastore.Allocate Datastore.AllocateSpace Datastore.AllocateTemplate Datastore.Audit
    Group.Allocate Mapping.Audit Mapping.Modify Mapping.Use Permissions.Modify
    Pool.Allocate Pool.Audit Realm.Allocate Realm.AllocateUser SDN.Allocate SDN.Audit SDN.Use
    Sys.AccessNetwork Sys.Audit Sys.Console Sys.Incoming Sys.Modify Sys.PowerMgmt Sys.Syslog
    User.Modify VM.Allocate VM.Audit VM.Backup VM.Clone VM.Config.CDROM VM.Config.CPU
    VM.Config.Cloudinit VM.Config.Disk VM.Config.HWType VM.Config.Memory VM.Config.Network
    VM.Config.Options VM.Console VM.GuestAgent.Audit VM.GuestAgent.FileRead
    VM.GuestAgent.FileSystemMgmt VM.GuestAgent.FileWrite VM.GuestAgent.Unrestricted
    VM.Migrate VM.PowerMgmt VM.Replicate VM.Snapshot VM.Snapshot.Rollback
'''.split())

# How a ticket's "cap" groups privileges (RPCEnvironment::compute_api_permission).
CAP_GROUPS = {
    'vms': r'VM\.|Permissions\.Modify',
    'access': r'(User|Group)\.|Permissions\.Modify',
    'storage': r'Datastore\.|Permissions\.Modify',
    'nodes': r'Sys\.|Permissions\.Modify',
    'sdn': r'SDN\.|Permissions\.Modify',
    'dc': r'Sys\.Audit|Sys\.Modify|SDN\.',
    'mapping': r'Mapping\.|Permissions\.Modify',
}


# ==============================================================================
# Answers and errors
# ==============================================================================

class Reply(NamedTuple):
    status: int
    reason: str         # the status line's text; PVE's error messages go here
    body: bytes


def to_json(value) -> bytes:
    return json.dumps(value, separators=(',', ':')).encode()


class ApiError(Exception):
    """An error of PVE's API handler: message in the status line and in a JSON body."""

    def __init__(self, status, message, errors=None):
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors

    def reply(self) -> Reply:
        body = {'data': None, 'message': self.message}
        if self.errors:
            body['errors'] = self.errors
        return Reply(self.status, self.message, to_json(body))


class ServerError(ApiError):
    """An error pveproxy answers itself (login, proxying to a node): no body at all."""

    def reply(self) -> Reply:
        return Reply(self.status, self.message, b'')


def forbidden(what) -> ApiError:
    return ApiError(403, 'Permission check failed ({})\n'.format(what))


class FixtureError(ValueError):
    pass


# ==============================================================================
# The fixture
# ==============================================================================

@dataclasses.dataclass(frozen=True)
class Identity:
    userid: str                 # a user, or a token: user@realm!name
    privileges: frozenset

    def has(self, privilege) -> bool:
        return privilege in self.privileges


class World:
    """One version of the fixture, with the look-ups the handlers need."""

    def __init__(self, data):
        self.name = data.get('cluster')
        self.version = data.get('version', DEFAULT_VERSION)
        self.nodes = {node['name']: node for node in data['nodes']}
        self.local_node = next((name for name in self.nodes if self.online(name)),
                               next(iter(self.nodes)))
        self.users = {user['userid']: user for user in data.get('users', [])}
        self.tokens = {'{}!{}'.format(user['userid'], token['id']): token
                       for user in self.users.values() for token in user.get('tokens', [])}
        self.storages = sorted(data.get('storage', []), key=lambda s: s['storage'])
        self.storage_digest = digest_of(self.storages)
        self.guests = {guest['vmid']: guest for guest in data.get('guests', [])}
        self.pools = {**{g['pool']: {} for g in self.guests.values() if g.get('pool')},
                      **data.get('pools', {})}
        self.templates = data.get('templates', {})
        self._check()

    def _check(self):
        if self.name is None and len(self.nodes) != 1:
            raise FixtureError('a standalone node ("cluster": null) needs exactly one node')
        for user in self.users.values():
            for holder in [user, *user.get('tokens', [])]:
                unknown = set(holder.get('privileges', ())) - PRIVILEGES
                if unknown:
                    raise FixtureError('{}: no such privileges: {}'.format(
                        user['userid'], ', '.join(sorted(unknown))))
        for vmid, guest in self.guests.items():
            if guest['node'] not in self.nodes or guest['type'] not in CONFIG_DIRS:
                raise FixtureError('guest {}: unknown node {!r} or type {!r}'.format(
                    vmid, guest['node'], guest['type']))

    def online(self, node) -> bool:
        return self.nodes[node]['status'] == 'online'

    def sorted_guests(self):
        # PVE sorts vmids as strings: 1000 comes before 999.
        return [self.guests[vmid] for vmid in sorted(self.guests, key=str)]

    def privileges(self, userid) -> frozenset:
        if userid == 'root@pam':
            return PRIVILEGES
        return frozenset(self.users[userid].get('privileges', ()))

    def user_identity(self, userid) -> Optional[Identity]:
        if userid not in self.users:
            return None
        return Identity(userid, self.privileges(userid))

    def token_identity(self, tokenid, secret) -> Optional[Identity]:
        token = self.tokens.get(tokenid)
        if token is None or token['secret'] != secret:
            return None
        userid = tokenid.split('!')[0]
        return Identity(tokenid, self.privileges(userid) & frozenset(token.get('privileges', ())))


class Fixture:
    """The fixture file, parsed again whenever it changes on disk."""

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._world = None

    def current(self) -> World:
        info = os.stat(self.path)
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            if stamp != self._stamp:
                with open(self.path, encoding='utf-8') as file:
                    self._world = World(json.load(file))
                self._stamp = stamp
            return self._world


def write_fixture(path, data):
    """Replace the fixture file in one step, so that the double never reads half of it."""
    temporary = '{}.{}.tmp'.format(path, os.getpid())
    with open(temporary, 'w', encoding='utf-8') as file:
        json.dump(data, file, indent=1)
    os.replace(temporary, path)


def digest_of(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()


# ==============================================================================
# What the cluster looks like (PVE::API2Tools' extract_*_stats)
# ==============================================================================

def node_status(world, name, with_figures):
    """A node entry; an offline one is bare, and figures need Sys.Audit."""
    node = world.nodes[name]
    entry = {'id': 'node/' + name, 'node': name, 'type': 'node', 'status': node['status']}
    if world.online(name):
        entry['level'] = node.get('level', '')
        if with_figures:
            entry.update({key: node.get(key, default) for key, default in NODE_FIGURES.items()})
    return entry


def node_fingerprint(call, name):
    if name == call.world.local_node:
        return call.api.fingerprint
    return colon_hex(hashlib.sha256('pve-double {}'.format(name).encode()).digest())


def vm_status(world, guest):
    """A guest entry: nothing but 'unknown' while its node is down."""
    kind, vmid = guest['type'], guest['vmid']
    entry = {'id': '{}/{}'.format(kind, vmid), 'vmid': vmid, 'node': guest['node'],
             'type': kind, 'status': 'unknown'}
    if world.online(guest['node']):
        entry.update(guest_figures(guest))
    return entry


def guest_figures(guest):
    config, vmid = guest['config'], guest['vmid']
    maxmem = memory_mib(config) * MiB
    maxdisk = boot_disk_size(guest)
    figures = {'name': guest_name(guest), 'status': guest['status'],
               'template': int(config.get('template', 0)),
               'maxcpu': int(config.get('cores', 1)) * int(config.get('sockets', 1)),
               'maxmem': maxmem, 'maxdisk': maxdisk,
               **dict.fromkeys(('uptime', 'cpu', 'mem', 'disk', 'netin', 'netout',
                                'diskread', 'diskwrite'), 0)}
    if guest['status'] == 'running':
        # Invented, but steady and different for every guest.
        figures.update(uptime=3600 + vmid * 97, cpu=round(0.01 + vmid % 23 / 100, 4),
                       mem=maxmem * (25 + vmid % 50) // 100, netin=vmid * 104_729,
                       netout=vmid * 52_361, diskread=vmid * 1_299_709,
                       diskwrite=vmid * 611_953)
        if guest['type'] == 'lxc':
            figures['disk'] = maxdisk // 3
    if guest['type'] == 'qemu':
        figures['memhost'] = figures['mem']
    return figures


def guest_name(guest):
    config, vmid = guest['config'], guest['vmid']
    if guest['type'] == 'qemu':
        return config.get('name') or 'VM {}'.format(vmid)
    return config.get('hostname') or 'CT{}'.format(vmid)


def memory_mib(config) -> int:
    # qemu: '2048' or 'current=2048'; lxc: 2048
    return int(str(config.get('memory', 512)).split(',')[0].rpartition('=')[2])


def boot_disk_size(guest) -> int:
    """What PVE shows as maxdisk: the size of the lxc rootfs or of the qemu boot disk."""
    config = guest['config']
    if guest['type'] == 'lxc':
        keys = ['rootfs']
    elif str(config.get('boot', '')).startswith('order='):
        keys = config['boot'][len('order='):].split(';')
    else:
        keys = [config.get('bootdisk')]
    for key in keys:
        size = re.search(r'(?:^|,)size=(\d+)([KMGT]?)', str(config.get(key, '')))
        if size:
            return int(size[1]) * SIZE_UNITS[size[2]]
    return 0


def storage_enabled(storage, node) -> bool:
    nodes = storage.get('nodes')
    return (not storage.get('disable')
            and (not nodes or node in {n.strip() for n in nodes.split(',')}))


def storage_status(world, storage, node):
    name = storage['storage']
    entry = {'id': 'storage/{}/{}'.format(node, name), 'storage': name, 'node': node,
             'type': 'storage', 'plugintype': storage['type'], 'status': 'unknown',
             'shared': storage.get('shared', 0), 'content': storage.get('content', '')}
    if world.online(node):
        used_percent = zlib.crc32(name.encode()) % 80 + 5
        entry.update(status='available', maxdisk=STORAGE_SIZE,
                     disk=STORAGE_SIZE // 100 * used_percent)
    return entry


def pool_info(world, poolid):
    info = {'poolid': poolid}
    if 'comment' in world.pools[poolid]:
        info['comment'] = world.pools[poolid]['comment']
    return info


# ==============================================================================
# Handlers
# ==============================================================================

@dataclasses.dataclass(frozen=True)
class Call:
    """What a handler gets: the double, the fixture, the caller, the checked parameters."""
    api: 'Api'
    world: World
    who: Optional[Identity]     # None on the one route without login
    params: dict


def create_ticket(call):
    params = call.params
    userid = params['username'] + ('@' + params['realm'] if params.get('realm') else '')
    user = call.world.users.get(userid)
    password = params['password']      # or a valid ticket, to renew it
    if user is None or (password != user.get('password')
                        and call.api.ticket_user(password) != userid):
        raise ApiError(401, 'authentication failure\n')
    ticket, csrf_token = call.api.issue_ticket(userid)
    privileges = call.world.privileges(userid)
    answer = {'username': userid, 'ticket': ticket, 'CSRFPreventionToken': csrf_token,
              'cap': {group: {p: 1 for p in sorted(privileges) if re.match(pattern, p)}
                      for group, pattern in CAP_GROUPS.items()}}
    if call.world.name and 'Sys.Audit' in privileges:
        answer['clustername'] = call.world.name
    return answer


def get_version(call):
    return dict(call.world.version)


def list_nodes(call):
    return [dict(node_status(call.world, name, call.who.has('Sys.Audit')),
                 ssl_fingerprint=node_fingerprint(call, name))
            for name in call.world.nodes]


def cluster_status(call):
    world = call.world
    entries = []
    if world.name is not None:
        online = sum(map(world.online, world.nodes))
        entries.append({'type': 'cluster', 'id': 'cluster', 'name': world.name,
                        'nodes': len(world.nodes), 'version': len(world.nodes),
                        'quorate': int(2 * online > len(world.nodes))})
    for nodeid, (name, node) in enumerate(world.nodes.items(), 1):
        entries.append({'type': 'node', 'id': 'node/' + name, 'name': name,
                        'nodeid': nodeid if world.name is not None else 0,
                        'local': int(name == world.local_node),
                        'online': int(world.online(name)), 'ip': node['ip'],
                        'level': node.get('level', '')})
    return entries


def pool_resources(call):
    if not call.who.has('Pool.Audit'):
        return []
    return [{'id': '/pool/' + poolid, 'pool': poolid, 'type': 'pool'}
            for poolid in sorted(call.world.pools)]


def vm_resources(call):
    if not call.who.has('VM.Audit'):
        return []
    entries = []
    for guest in call.world.sorted_guests():
        entry = vm_status(call.world, guest)
        entry.update({key: guest['config'][key] for key in ('lock', 'tags')
                      if key in guest['config']})
        if guest.get('pool') and call.who.has('Pool.Audit'):
            entry['pool'] = guest['pool']
        if 'hastate' in guest:
            entry['hastate'] = guest['hastate']
        entries.append(entry)
    return entries


def node_resources(call):
    return [node_status(call.world, name, call.who.has('Sys.Audit'))
            for name in call.world.nodes]


def storage_resources(call):
    if not call.who.has('Datastore.Audit'):
        return []
    return [storage_status(call.world, storage, node)
            for storage in call.world.storages for node in call.world.nodes
            if storage_enabled(storage, node)]


RESOURCE_LISTS = {'vm': vm_resources, 'node': node_resources,
                  'storage': storage_resources, 'sdn': lambda call: []}


def cluster_resources(call):
    kind = call.params.get('type')
    if kind:
        return RESOURCE_LISTS[kind](call)
    return [entry for listing in (pool_resources, vm_resources, node_resources,
                                  storage_resources)
            for entry in listing(call)]


def list_storage(call):
    if not (call.who.has('Datastore.Audit') or call.who.has('Datastore.AllocateSpace')):
        return []
    kind = call.params.get('type')
    return [dict(storage, digest=call.world.storage_digest) for storage in call.world.storages
            if kind in (None, storage['type'])]


def list_pools(call):
    poolid = call.params.get('poolid')
    if poolid is None:
        if not call.who.has('Pool.Audit'):
            return []
        return [pool_info(call.world, poolid) for poolid in sorted(call.world.pools)]
    # PVE checks no privilege for a single pool's members.
    if poolid not in call.world.pools:
        raise ApiError(500, "pool '{}' does not exist\n".format(poolid))
    kind = call.params.get('type')
    members = [vm_status(call.world, guest) for guest in call.world.sorted_guests()
               if guest.get('pool') == poolid and kind in (None, guest['type'])]
    return [dict(pool_info(call.world, poolid), members=members)]


def load_guest(call, kind):
    """The guest of this kind at this node and vmid, else PVE's missing config file."""
    node, vmid = call.params['node'], call.params['vmid']
    guest = call.world.guests.get(vmid)
    if guest is None or (guest['node'], guest['type']) != (node, kind):
        raise ApiError(500, "Configuration file 'nodes/{}/{}/{}.conf' does not exist\n".format(
            node, CONFIG_DIRS[kind], vmid))
    return guest


def guest_config(call, kind):
    guest = load_guest(call, kind)
    snapshot = call.params.get('snapshot')
    if snapshot is not None:
        raise ApiError(500, "snapshot '{}' does not exist\n".format(snapshot))
    return dict(guest['config'], digest=digest_of(guest['config']))


class GuestAgents:
    """The guests' file systems, frozen or thawed by their QEMU guest agents."""

    def __init__(self):
        self._frozen = set()
        self._lock = threading.Lock()

    @property
    def frozen(self) -> frozenset:
        with self._lock:
            return frozenset(self._frozen)

    def freeze(self, guest):
        vmid = guest['vmid']
        with self._lock:
            if vmid in self._frozen:
                # qemu-ga disables the command while frozen; PVE passes the error on.
                raise ApiError(500, "VM {} qmp command 'guest-fsfreeze-freeze' failed - Command "
                               "guest-fsfreeze-freeze has been disabled: the agent is in "
                               "frozen state\n".format(vmid))
            self._frozen.add(vmid)
        return guest.get('filesystems', 1)

    def thaw(self, guest):
        with self._lock:
            if guest['vmid'] not in self._frozen:
                return 0
            self._frozen.remove(guest['vmid'])
        return guest.get('filesystems', 1)

    def status(self, guest):
        with self._lock:
            return 'frozen' if guest['vmid'] in self._frozen else 'thawed'


def fsfreeze(call, command):
    guest = load_guest(call, 'qemu')
    assert_agent_available(guest)
    return {'result': command(call.api.agents, guest)}


def assert_agent_available(guest):
    # The order and wording of qemu-server's assert_agent_available. An "agent: 0"
    # passes its first check: the agent is then simply not there to answer.
    config = guest['config']
    if 'agent' not in config:
        raise ApiError(500, 'No QEMU guest agent configured\n')
    if guest['status'] != 'running':
        raise ApiError(500, 'VM {} is not running\n'.format(guest['vmid']))
    if not (agent_enabled(config['agent']) and guest.get('agent_running', True)):
        raise ApiError(500, 'QEMU guest agent is not running\n')


def agent_enabled(value) -> bool:
    """The enabled flag of an agent property string: '1', 'enabled=1,type=virtio', ..."""
    for part in str(value).split(','):
        key, _, flag = part.rpartition('=')
        if key in ('', 'enabled'):
            return flag in ('1', 'on', 'yes', 'true')
    return False


# What creating a guest needs besides VM.Allocate (qemu-server's and
# pve-container's check_*_modify_config_perm): a privilege per kind of key.
CONFIG_PRIVILEGES = (
    (r'cores|sockets|cpu|cpulimit|cpuunits|vcpus|numa', 'VM.Config.CPU'),
    (r'memory|balloon|shares|swap', 'VM.Config.Memory'),
    (r'net\d+', 'VM.Config.Network'),
    (r'(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0|rootfs|mp\d+|unused\d+',
     'VM.Config.Disk'),
    (r'scsihw|bios|machine|vga|serial\d+|hostpci\d+|usb\d+|arch', 'VM.Config.HWType'),
)
NOT_CONFIG = ('node', 'vmid', 'ostemplate', 'start', 'storage', 'pool', 'unique', 'restore',
              'force')


def config_privilege(key, value) -> str:
    if 'media=cdrom' in str(value):
        return 'VM.Config.Cloudinit' if 'cloudinit' in str(value) else 'VM.Config.CDROM'
    for pattern, privilege in CONFIG_PRIVILEGES:
        if re.fullmatch(pattern, key):
            return privilege
    return 'VM.Config.Options'


# The VM config keys a create call by a user other than root@pam may carry
# (qemu-server's check_vm_modify_config_perm, PVE/API2/Qemu.pm): its option
# lists and the drives; serial, usb and hostpci devices are judged by their
# value (root_only_device). Any other key: "only root can set '$opt' config".
QEMU_OPTION_LISTS = '''
    cores cpu runningcpu cpulimit cpuunits numa smp sockets vcpus
    memory balloon shares allow-ksm
    acpi hotplug kvm machine runningmachine scsihw smbios1 tablet vga watchdog audio0 rng0
    agent autostart bios description keyboard localtime migrate_downtime migrate_speed name
    onboot ostype protection reboot startdate startup tdf template
    freeze boot bootdisk vmstatestorage
    cicustom cipassword citype ciuser ciupgrade nameserver searchdomain sshkeys
    vmstate running-nets-host-mtu cdrom tags'''.split()
QEMU_NOT_CHECKED = r'(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0|unused\d+|numa\d+|net\d+|' \
    r'ipconfig\d+|virtiofs\d+|serial\d+|usb\d+|hostpci\d+'


def root_only_error(kind, config) -> Optional[ApiError]:
    """What PVE answers a user other than root@pam who creates a guest with
    a key only root@pam may set: qemu-server dies (500), pve-container raises
    a permission exception (403)."""
    for key, value in sorted(config.items()):
        value = str(value)
        options = dict(part.partition('=')[::2] for part in value.split(','))
        if kind == 'lxc':
            features = {name for name, on in options.items() if on not in ('0', '')}
            if re.fullmatch(r'dev\d+', key):
                return forbidden('configuring device passthrough is only allowed for root@pam')
            if key == 'hookscript':
                return forbidden('changing the hookscript is only allowed for root@pam')
            if key == 'features' and str(config.get('unprivileged', '1')) != '1':
                return forbidden('changing feature flags for privileged container is only '
                                 'allowed for root@pam')
            if key == 'features' and features - {'nesting'}:
                return forbidden('changing feature flags (except nesting) is only allowed '
                                 'for root@pam')
            if re.fullmatch(r'rootfs|mp\d+', key) and value.startswith('/'):
                return forbidden('mount point type bind is only allowed for root@pam')
            continue
        if re.fullmatch(r'serial\d+', key) and value != 'socket' or (
                re.fullmatch(r'usb\d+', key) and options.get('host', 'spice').lower() != 'spice'):
            return ApiError(500, "only root can set '{}' config for real devices\n".format(key))
        if re.fullmatch(r'hostpci\d+', key) and 'mapping' not in options:
            return ApiError(500, "only root can set '{}' config for non-mapped devices\n"
                            .format(key))
        if key not in QEMU_OPTION_LISTS and not re.fullmatch(QEMU_NOT_CHECKED, key):
            return ApiError(500, "only root can set '{}' config\n".format(key))
    return None


def check_create_privileges(call, config, kind):
    """What PVE checks of a create call: VM.Allocate, a privilege per config
    key (and root@pam alone for some), Datastore.AllocateSpace on each storage
    a volume is on, SDN.Use on each bridge."""
    vmid = call.params['vmid']
    needed = [('/vms/{}'.format(vmid), 'VM.Allocate')]
    needed += [('/vms/{}'.format(vmid), config_privilege(k, v)) for k, v in sorted(config.items())]
    for key, value in sorted(config.items()):
        source = str(value).split(',')[0]
        if config_privilege(key, value) == 'VM.Config.Disk' and ':' in source:
            needed.append(('/storage/' + source.split(':')[0], 'Datastore.AllocateSpace'))
        bridge = re.search(r'(?:^|,)bridge=([^,]+)', str(value))
        if key.startswith('net') and bridge:
            needed.append(('/sdn/zones/localnetwork/' + bridge.group(1), 'SDN.Use'))
    if call.who.userid == 'root@pam':
        return
    for path, privilege in needed:
        if not call.who.has(privilege):
            raise forbidden('{}, {}'.format(path, privilege))
    error = root_only_error(kind, config)
    if error:
        raise error


class Tasks:
    """The tasks started by calls (creating, starting): they end at once."""

    def __init__(self):
        self._done = {}
        self._lock = threading.Lock()
        self._count = 0

    def finish(self, node, kind, what, userid, error=None) -> str:
        with self._lock:
            self._count += 1
            now = int(time.time())
            upid = 'UPID:{}:{:08X}:{:08X}:{:08X}:{}:{}:{}:'.format(
                node, 4000 + self._count, 100000 + self._count, now, kind, what, userid)
            self._done[upid] = {'upid': upid, 'node': node, 'pid': 4000 + self._count,
                                'pstart': 100000 + self._count, 'starttime': now,
                                'type': kind, 'id': str(what), 'user': userid,
                                'status': 'stopped', 'exitstatus': error or 'OK'}
        return upid

    def status(self, upid):
        with self._lock:
            return self._done.get(upid)


def permissions(call):
    """What the caller may do; here every privilege holds on every path."""
    path = call.params.get('path', '/')
    return {path: {privilege: 1 for privilege in sorted(call.who.privileges)}}


def task_status(call):
    task = call.api.tasks.status(call.params['upid'])
    if task is None or task['node'] != call.params['node']:
        raise ApiError(500, "no such task '{}'\n".format(call.params['upid']))
    return dict(task)


def next_vmid(call):
    taken = set(call.world.guests)
    return next(vmid for vmid in range(100, 1_000_000_000) if vmid not in taken)


def create_guest(call, kind):
    """POST /nodes/{node}/qemu or /lxc: the guest joins the fixture."""
    params, world = call.params, call.world
    node, vmid = params['node'], params['vmid']
    config = {key: value for key, value in params.items() if key not in NOT_CONFIG}
    check_create_privileges(call, config, kind)
    word = 'VM' if kind == 'qemu' else 'CT'
    if vmid in world.guests:
        raise ApiError(500, '{} {} already exists on node {!r}\n'.format(
            word, vmid, world.guests[vmid]['node']))
    if kind == 'lxc':
        if str(config.get('unprivileged', '1')) != '1' and not (
                call.who.userid == 'root@pam' or call.who.has('Sys.Modify')):
            raise forbidden('/, Sys.Modify')    # a privileged container
        storage, _, name = params['ostemplate'].partition(':vztmpl/')
        if name not in world.templates.get('{}/{}'.format(node, storage), ()):
            raise ApiError(500, "volume '{}' does not exist\n".format(params['ostemplate']))
        if str(config.pop('unprivileged', '1')) == '1':
            config['unprivileged'] = 1
    guest = {'vmid': vmid, 'type': kind, 'node': node,
             'status': 'running' if params.get('start') else 'stopped', 'config': config}
    call.api.change_fixture(lambda data: data['guests'].append(guest))
    return call.api.tasks.finish(node, 'qmcreate' if kind == 'qemu' else 'vzcreate', vmid,
                                 call.who.userid)


def update_container_config(call):
    guest = load_guest(call, 'lxc')
    changes = {key: value for key, value in call.params.items()
               if key not in ('node', 'vmid', 'delete', 'digest')}
    if call.params.get('digest') not in (None, digest_of(guest['config'])):
        raise ApiError(500, 'detected modified configuration - file changed by other user? '
                            'Try again.\n')

    def change(data):
        config = next(g for g in data['guests'] if g['vmid'] == guest['vmid'])['config']
        config.update(changes)
        for key in filter(None, call.params.get('delete', '').split(',')):
            config.pop(key, None)
    call.api.change_fixture(change)
    return None


def start_guest(call, kind):
    guest = load_guest(call, kind)

    def change(data):
        next(g for g in data['guests'] if g['vmid'] == guest['vmid'])['status'] = 'running'
    call.api.change_fixture(change)
    return call.api.tasks.finish(call.params['node'], 'qmstart' if kind == 'qemu'
                                 else 'vzstart', guest['vmid'], call.who.userid)


def storage_content(call):
    node, storage = call.params['node'], call.params['storage']
    entries = []
    if call.params.get('content') in (None, 'vztmpl'):
        entries = [{'volid': '{}:vztmpl/{}'.format(storage, name), 'format': 'tgz',
                    'content': 'vztmpl', 'size': 10240, 'ctime': 1700000000}
                   for name in call.world.templates.get('{}/{}'.format(node, storage), ())]
    return entries


def upload_file(call):
    node, storage = call.params['node'], call.params['storage']
    where = next((s for s in call.world.storages if s['storage'] == storage), None)
    if where is None or call.params['content'] not in where.get('content', ''):
        raise ApiError(500, "storage '{}' does not support content type '{}'\n".format(
            storage, call.params['content']))
    name = call.params['filename']
    call.api.change_fixture(lambda data: data.setdefault('templates', {}).setdefault(
        '{}/{}'.format(node, storage), []).append(name))
    return call.api.tasks.finish(node, 'imgcopy', '', call.who.userid)


# ==============================================================================
# Routes
# ==============================================================================

@dataclasses.dataclass(frozen=True)
class Route:
    """One API method: what apidata.json says of it (the tests compare) and its handler."""
    method: str
    path: str                           # a template of apidata.json: /nodes/{node}/...
    handler: Callable[[Call], object]
    params: dict = dataclasses.field(default_factory=dict)  # PVE's JSON schema, in part
    check: Optional[tuple] = None       # apidata.json's permissions.check
    proxy: bool = False                 # the node in the path answers (proxyto: node)
    allowtoken: bool = True
    login: bool = True


NODE = {'type': 'string'}
VMID = {'type': 'integer', 'minimum': 100, 'maximum': 999999999}
GUEST = {'node': NODE, 'vmid': VMID}
CONFIG_PARAMS = {**GUEST, 'current': {'type': 'boolean', 'optional': 1},
                 'snapshot': {'type': 'string', 'optional': 1, 'maxLength': 40}}
TICKET_PARAMS = {'username': {'type': 'string', 'maxLength': 64},
                 'password': {'type': 'string'},
                 'realm': {'type': 'string', 'optional': 1, 'maxLength': 32},
                 'new-format': {'type': 'boolean', 'optional': 1}}
STORAGE_TYPES = ['btrfs', 'cephfs', 'cifs', 'dir', 'esxi', 'iscsi', 'iscsidirect', 'lvm',
                 'lvmthin', 'nfs', 'pbs', 'rbd', 'zfs', 'zfspool']
POOL_PARAMS = {'poolid': {'type': 'string', 'optional': 1},
               'type': {'type': 'string', 'optional': 1, 'enum': ['qemu', 'lxc', 'storage'],
                        'requires': 'poolid'}}
VM_AUDIT = ('perm', '/vms/{vmid}', ('VM.Audit',))
FS_MGMT = ('VM.GuestAgent.FileSystemMgmt', 'VM.GuestAgent.Unrestricted')
FS_MGMT_CHECK = ('perm', '/vms/{vmid}', FS_MGMT, 'any', 1)
AGENT = '/nodes/{node}/qemu/{vmid}/agent/'
OPTIONAL_STRING = {'type': 'string', 'optional': 1}
OPTIONAL_INTEGER = {'type': 'integer', 'optional': 1}
OPTIONAL_BOOLEAN = {'type': 'boolean', 'optional': 1}
VMID_OPTIONAL = dict(VMID, optional=1)
STORAGE_ID = {'type': 'string'}
# The config keys a create call may carry here: those of the fixtures, and
# then some (PVE's schema has all; the route test checks these against it).
QEMU_CREATE = {
    **dict.fromkeys(('name', 'memory', 'boot', 'bootdisk', 'machine', 'agent', 'tags',
                     'vmgenid', 'cpu', 'vga', 'pool', 'scsi[n]', 'virtio[n]', 'sata[n]',
                     'ide[n]', 'net[n]', 'efidisk0', 'tpmstate0', 'serial[n]', 'args',
                     'hookscript', 'affinity', 'hostpci[n]', 'usb[n]', 'cipassword',
                     'ciuser', 'ipconfig[n]'),
                    OPTIONAL_STRING),
    **dict.fromkeys(('onboot', 'numa', 'start', 'template', 'protection'), OPTIONAL_BOOLEAN),
    'cores': {'type': 'integer', 'optional': 1, 'minimum': 1},
    'sockets': {'type': 'integer', 'optional': 1, 'minimum': 1},
    'balloon': {'type': 'integer', 'optional': 1, 'minimum': 0},
    'ostype': {'type': 'string', 'optional': 1, 'enum': [
        'other', 'wxp', 'w2k', 'w2k3', 'w2k8', 'wvista', 'win7', 'win8', 'win10', 'win11',
        'l24', 'l26', 'solaris']},
    'scsihw': {'type': 'string', 'optional': 1, 'enum': [
        'lsi', 'lsi53c810', 'virtio-scsi-pci', 'virtio-scsi-single', 'megasas', 'pvscsi']},
    'bios': {'type': 'string', 'optional': 1, 'enum': ['seabios', 'ovmf']},
    'smbios1': {'type': 'string', 'optional': 1, 'maxLength': 512},
    'description': {'type': 'string', 'optional': 1, 'maxLength': 8192},
}
LXC_OSTYPE = {'type': 'string', 'optional': 1, 'enum': [
    'debian', 'devuan', 'ubuntu', 'centos', 'fedora', 'opensuse', 'archlinux', 'alpine',
    'gentoo', 'nixos', 'unmanaged']}
LXC_UPDATE = {
    'ostype': LXC_OSTYPE,
    'hostname': {'type': 'string', 'optional': 1, 'maxLength': 255},
    'description': {'type': 'string', 'optional': 1, 'maxLength': 8192},
    'delete': OPTIONAL_STRING,
    'digest': {'type': 'string', 'optional': 1, 'maxLength': 40},
}
LXC_CREATE = {
    **{key: LXC_UPDATE[key] for key in ('ostype', 'hostname', 'description')},
    **dict.fromkeys(('rootfs', 'mp[n]', 'net[n]', 'tags', 'features', 'nameserver',
                     'searchdomain', 'timezone', 'startup', 'pool', 'hookscript', 'dev[n]'),
                    OPTIONAL_STRING),
    **dict.fromkeys(('unprivileged', 'onboot', 'console', 'protection', 'start', 'template'),
                    OPTIONAL_BOOLEAN),
    'ostemplate': {'type': 'string', 'maxLength': 255},
    'arch': {'type': 'string', 'optional': 1, 'enum': [
        'amd64', 'i386', 'arm64', 'armhf', 'riscv32', 'riscv64']},
    'cores': {'type': 'integer', 'optional': 1, 'minimum': 1, 'maximum': 8192},
    'memory': {'type': 'integer', 'optional': 1, 'minimum': 16},
    'swap': {'type': 'integer', 'optional': 1, 'minimum': 0},
    'tty': {'type': 'integer', 'optional': 1, 'minimum': 0, 'maximum': 6},
    'cmode': {'type': 'string', 'optional': 1, 'enum': ['shell', 'console', 'tty']},
}

ROUTES = (
    Route('POST', '/access/ticket', create_ticket, TICKET_PARAMS, allowtoken=False, login=False),
    Route('GET', '/version', get_version),
    Route('GET', '/nodes', list_nodes),
    Route('GET', '/cluster/status', cluster_status, check=('perm', '/', ('Sys.Audit',))),
    Route('GET', '/cluster/resources', cluster_resources,
          {'type': {'type': 'string', 'optional': 1, 'enum': ['vm', 'storage', 'node', 'sdn']}}),
    Route('GET', '/storage', list_storage,
          {'type': {'type': 'string', 'optional': 1, 'enum': STORAGE_TYPES}}),
    Route('GET', '/pools', list_pools, POOL_PARAMS),
    Route('GET', '/nodes/{node}/qemu/{vmid}/config',
          functools.partial(guest_config, kind='qemu'), CONFIG_PARAMS, VM_AUDIT, proxy=True),
    Route('GET', '/nodes/{node}/lxc/{vmid}/config',
          functools.partial(guest_config, kind='lxc'), CONFIG_PARAMS, VM_AUDIT, proxy=True),
    Route('POST', AGENT + 'fsfreeze-freeze',
          functools.partial(fsfreeze, command=GuestAgents.freeze), GUEST, FS_MGMT_CHECK,
          proxy=True),
    Route('POST', AGENT + 'fsfreeze-thaw',
          functools.partial(fsfreeze, command=GuestAgents.thaw), GUEST, FS_MGMT_CHECK,
          proxy=True),
    Route('GET', '/cluster/nextid', next_vmid, {'vmid': VMID_OPTIONAL}),
    Route('GET', '/access/permissions', permissions, {'path': OPTIONAL_STRING}),
    Route('GET', '/nodes/{node}/tasks/{upid}/status', task_status,
          {'node': NODE, 'upid': {'type': 'string'}}, proxy=True),
    Route('POST', '/nodes/{node}/qemu', functools.partial(create_guest, kind='qemu'),
          {**GUEST, **QEMU_CREATE}, proxy=True),
    Route('POST', '/nodes/{node}/lxc', functools.partial(create_guest, kind='lxc'),
          {**GUEST, **LXC_CREATE}, proxy=True),
    Route('PUT', '/nodes/{node}/lxc/{vmid}/config', update_container_config,
          {**GUEST, **LXC_UPDATE},
          ('perm', '/vms/{vmid}', ('VM.Config.Disk', 'VM.Config.CPU', 'VM.Config.Memory',
                                   'VM.Config.Network', 'VM.Config.Options'), 'any', 1),
          proxy=True),
    Route('POST', '/nodes/{node}/qemu/{vmid}/status/start',
          functools.partial(start_guest, kind='qemu'), GUEST,
          ('perm', '/vms/{vmid}', ('VM.PowerMgmt',)), proxy=True),
    Route('POST', '/nodes/{node}/lxc/{vmid}/status/start',
          functools.partial(start_guest, kind='lxc'), GUEST,
          ('perm', '/vms/{vmid}', ('VM.PowerMgmt',)), proxy=True),
    Route('GET', '/nodes/{node}/storage/{storage}/content', storage_content,
          {'node': NODE, 'storage': STORAGE_ID, 'content': OPTIONAL_STRING,
           'vmid': VMID_OPTIONAL},
          ('perm', '/storage/{storage}', ('Datastore.Audit', 'Datastore.AllocateSpace'),
           'any', 1), proxy=True),
    Route('POST', '/nodes/{node}/storage/{storage}/upload', upload_file,
          {'node': NODE, 'storage': STORAGE_ID,
           'content': {'type': 'string', 'enum': ['iso', 'vztmpl', 'import']},
           'filename': {'type': 'string', 'maxLength': 255}},
          ('perm', '/storage/{storage}', ('Datastore.AllocateTemplate',))),
    Route('POST', AGENT + 'fsfreeze-status',
          functools.partial(fsfreeze, command=GuestAgents.status), GUEST,
          ('perm', '/vms/{vmid}', ('VM.GuestAgent.Audit', *FS_MGMT), 'any', 1), proxy=True),
)


@functools.lru_cache(maxsize=None)
def _path_pattern(template):
    return re.compile(re.sub(r'\{(\w+)\}', r'(?P<\1>[^/]+)', template))


def find_route(method, path):
    """The route serving `method path` and the values of its {placeholders}, or (None, {})."""
    path = '/' + '/'.join(part for part in path.split('/') if part)
    for route in ROUTES:
        match = _path_pattern(route.path).fullmatch(path)
        if match and route.method == method:
            return route, match.groupdict()
    return None, {}


def check_permission(check, who, path_params):
    """PVE's 403 unless `who` passes the route's check (root@pam passes them all)."""
    if check is None or who.userid == 'root@pam':
        return
    _, acl_template, privileges, *mode = check
    acl_path = acl_template.format(**path_params)
    if 'any' in mode:
        if not any(map(who.has, privileges)):
            raise forbidden('{}, {}'.format(acl_path, '|'.join(privileges)))
        return
    for privilege in privileges:
        if not who.has(privilege):
            raise forbidden('{}, {}'.format(acl_path, privilege))


def check_node(world, node):
    """Fail as pveproxy does when it cannot pass a call on to `node`."""
    if node not in world.nodes:
        raise ApiError(500, "hostname lookup '{0}' failed - failed to get address info for: "
                            "{0}: Name or service not known\n".format(node))
    if not world.online(node):
        raise ServerError(595, 'No route to host')


def validate_params(schema, params):
    """The parameters checked and typed as PVE's JSON schema code does, else its 400."""
    props = {name: schema_property(schema, name) for name in params}
    errors = {name: 'property is not defined in schema and the schema does not allow '
                    'additional properties' for name, prop in props.items() if prop is None}
    for name, prop in schema.items():
        if name not in params and '[n]' not in name and not prop.get('optional'):
            errors[name] = 'property is missing and it is not optional'
    for name, prop in props.items():
        if prop is None:
            continue
        if 'requires' in prop and prop['requires'] not in params:
            errors[prop['requires']] = "missing property required by '{}'".format(name)
        else:
            error = value_error(prop, str(params[name]))
            if error:
                errors[name] = error
    if errors:
        raise ApiError(400, 'Parameter verification failed.\n', errors)
    typed = {'string': str, 'integer': int, 'boolean': int}
    return {name: typed[props[name]['type']](value) for name, value in params.items()}


def schema_property(schema, name):
    """The schema of parameter `name`; scsi[n] stands for scsi0, scsi1, ..."""
    if name in schema:
        return schema[name]
    return next((prop for key, prop in schema.items() if '[n]' in key and re.fullmatch(
        re.escape(key).replace(r'\[n\]', r'\d+'), name)), None)


def value_error(prop, value) -> Optional[str]:
    kind = prop['type']
    if (kind == 'integer' and not re.fullmatch(r'[+-]?\d+', value)
            or kind == 'boolean' and value not in ('0', '1')):
        return "type check ('{}') failed - got '{}'".format(kind, value)
    if 'maxLength' in prop and len(value) > prop['maxLength']:
        return 'value may only be {} characters long'.format(prop['maxLength'])
    if 'maximum' in prop and int(value) > prop['maximum']:
        return 'value must have a maximum value of {}'.format(prop['maximum'])
    if 'minimum' in prop and int(value) < prop['minimum']:
        return 'value must have a minimum value of {}'.format(prop['minimum'])
    if 'enum' in prop and value not in prop['enum']:
        return "value '{}' does not have a value in the enumeration '{}'".format(
            value, ', '.join(prop['enum']))
    return None


def request_params(method, query, headers, body):
    params = {}
    if method in ('POST', 'PUT'):
        if headers.get_content_type() == 'application/json':
            params = json.loads(body or b'{}')
        elif headers.get_content_type() == 'multipart/form-data':
            params = multipart_params(headers['Content-Type'], body)
        else:
            params = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
    params.update(urllib.parse.parse_qsl(query, keep_blank_values=True))
    return params


def multipart_params(content_type, body):
    """The fields of a multipart form; a file's field holds its file name, as
    pveproxy passes an upload on (the data goes to a temporary file)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b'Content-Type: ' + content_type.encode() + b'\r\n\r\n' + body)
    params = {}
    for part in message.iter_parts():
        name = part.get_param('name', header='content-disposition')
        params[name] = part.get_filename() or part.get_content()
    return params


def auth_value(header, key):
    """A credential in a Cookie or Authorization header, found as pveproxy finds it."""
    match = re.search(r'(?:^|\s){}(?:=| )([^;]*)'.format(re.escape(key)), header or '')
    return urllib.parse.unquote(match[1]) if match and match[1] else None


# ==============================================================================
# The API, apart from HTTP
# ==============================================================================

class Api:
    """Answers requests: credentials, routes, privileges, the fixture, the agents."""

    def __init__(self, fixture_path, latency=0.0, on_call=None):
        self.fixture = Fixture(fixture_path)
        self.latency = latency
        self.on_call = on_call          # called with (method, path) of every call
        self.agents = GuestAgents()
        self.tasks = Tasks()
        self.fingerprint = None         # of the certificate, once there is one
        self._secret = secrets.token_bytes(32)
        self._calls = []
        self._lock = threading.Lock()

    @property
    def calls(self):
        with self._lock:
            return list(self._calls)

    def change_fixture(self, change):
        """Apply change(data) to the fixture file, as PVE writes a config file."""
        with self._lock:
            with open(self.fixture.path, encoding='utf-8') as file:
                data = json.load(file)
            change(data)
            write_fixture(self.fixture.path, data)

    def reset_calls(self):
        with self._lock:
            self._calls.clear()

    def handle(self, method, target, headers, body) -> Reply:
        if self.latency:
            time.sleep(self.latency)
        url = urllib.parse.urlsplit(target)
        path = urllib.parse.unquote(url.path)
        if not (path + '/').startswith(API_PREFIX + '/'):
            return ServerError(500, "no such file '{}'".format(path)).reply()
        path = path[len(API_PREFIX):] or '/'
        with self._lock:
            self._calls.append((method, path))
        if self.on_call:
            self.on_call(method, path)
        try:
            params = request_params(method, url.query, headers, body)
            data = self._dispatch(method, path, params, headers)
        except ApiError as error:
            return error.reply()
        except Exception as error:      # what PVE answers when its handler dies
            traceback.print_exc()
            return ApiError(500, '{}\n'.format(error)).reply()
        return Reply(200, 'OK', to_json({'data': data}))

    def _dispatch(self, method, path, params, headers):
        # The order of pveproxy: login, route, token use, privileges, proxying
        # to the node, then the parameters (checked by the node that answers).
        world = self.fixture.current()
        route, path_params = find_route(method, path)
        who, by_token = self._identify(method, route, headers, world)
        if route is None:
            raise ApiError(501, "Method '{} {}' not implemented".format(method, path))
        if by_token and not route.allowtoken:
            raise forbidden("URI '{}' not available with API token, need proper ticket.\n"
                            .format(path))
        check_permission(route.check, who, path_params)
        if route.proxy:
            check_node(world, path_params['node'])
        params = validate_params(route.params, {**params, **path_params})
        return route.handler(Call(self, world, who, params))

    def _identify(self, method, route, headers, world):
        """Who sends the request (None where no login is needed), and if with a token."""
        authorization = headers.get('Authorization')
        ticket = (auth_value(headers.get('Cookie'), 'PVEAuthCookie')
                  or auth_value(authorization, 'PVEAuthCookie'))
        token = None if ticket else auth_value(authorization, 'PVEAPIToken')
        if route is not None and not route.login:
            return None, bool(token)
        if token:
            tokenid, _, secret = token.rpartition('=')
            who = world.token_identity(tokenid, secret)
        elif ticket:
            userid = self.ticket_user(ticket)
            who = userid and world.user_identity(userid)
        else:
            raise ServerError(401, 'No ticket')
        if not who:
            raise ServerError(401, 'Authentication failed!')
        if method != 'GET' and not token and not self._csrf_valid(
                who.userid, headers.get('CSRFPreventionToken')):
            raise ServerError(401, 'Permission denied - invalid csrf token')
        return who, bool(token)

    # Tickets and CSRF tokens are signed with a secret of this double alone,
    # so only the tickets it issued (in the last two hours) are valid.

    def issue_ticket(self, userid):
        stamp = '{:08X}'.format(int(time.time()))
        plain = 'PVE:{}:{}'.format(userid, stamp)
        csrf_token = '{}:{}'.format(stamp, self._sign('{}:{}'.format(stamp, userid)))
        return '{}::{}'.format(plain, self._sign(plain)), csrf_token

    def ticket_user(self, ticket) -> Optional[str]:
        """The user named by a valid ticket, else None."""
        match = re.fullmatch(r'(PVE:([^:]+):([0-9A-F]{8}))::(\S+)', ticket)
        if match and self._signed(match[1], match[4], match[3]):
            return match[2]
        return None

    def _csrf_valid(self, userid, token) -> bool:
        match = re.fullmatch(r'([0-9A-F]{8}):(\S+)', token or '')
        return bool(match) and self._signed('{}:{}'.format(match[1], userid), match[2], match[1])

    def _signed(self, plain, signature, stamp) -> bool:
        age = time.time() - int(stamp, 16)
        return (-300 < age < TICKET_LIFETIME
                and hmac.compare_digest(self._sign(plain).encode(), signature.encode()))

    def _sign(self, plain) -> str:
        digest = hmac.new(self._secret, plain.encode(), hashlib.sha256).digest()
        return b64encode(digest).decode().rstrip('=')


# ==============================================================================
# HTTPS
# ==============================================================================

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'pve-api-daemon/3.0'
    sys_version = ''
    timeout = 60

    def do_GET(self):
        faults = self.server.faults
        faults.wait_until_answering()
        length = int(self.headers.get('Content-Length') or 0)
        reply = self.server.api.handle(self.command, self.path, self.headers,
                                       self.rfile.read(length))
        if faults.take_drop():
            self.close_connection = True        # done, but the answer is lost
            return
        self.send_response(reply.status, status_text(reply.reason))
        if reply.body:
            self.send_header('Content-Type', 'application/json;charset=UTF-8')
        self.send_header('Content-Length', str(len(reply.body)))
        if reply.status >= 400:
            self.send_header('Connection', 'close')     # as pveproxy after an error
        self.end_headers()
        self.wfile.write(reply.body)

    do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):
        pass    # `calls` tells what was asked


def status_text(message):
    line = message.split('\n', 1)[0]
    return line.encode('latin-1', 'replace').decode('latin-1')


class Faults:
    """Connections dropped after their request was handled, or no answers at all."""

    def __init__(self):
        self._lock = threading.Lock()
        self._drops = 0
        self._answering = threading.Event()
        self._answering.set()

    def drop(self, count):
        with self._lock:
            self._drops += count

    def take_drop(self) -> bool:
        with self._lock:
            if not self._drops:
                return False
            self._drops -= 1
            return True

    def hang(self):
        self._answering.clear()

    def answer(self):
        self._answering.set()

    def wait_until_answering(self):
        self._answering.wait()


class _TlsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, api, tls, faults):
        if ':' in address[0]:
            self.address_family = socket.AF_INET6
        self.api, self.tls, self.faults = api, tls, faults
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address):
        # The handshake happens here, in the request's own thread, so that a
        # slow or failing client does not hold up the others.
        request.settimeout(_Handler.timeout)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.tls.wrap_socket(request, server_side=True) as tls_request:
            super().finish_request(tls_request, client_address)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def ensure_certificate(directory, names):
    """The certificate and key in `directory`, made with openssl unless already there."""
    cert, key = os.path.join(directory, CERT_FILE), os.path.join(directory, KEY_FILE)
    if os.path.exists(cert) and os.path.exists(key):
        return cert, key
    os.makedirs(directory, exist_ok=True)
    san = ','.join(('IP:' if is_ip(name) else 'DNS:') + name for name in names)
    command = ['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
               '-nodes', '-days', '3650', '-subj', '/CN=' + names[0], '-keyout', key, '-out', cert,
               '-addext', 'subjectAltName=' + san,
               # a self-signed certificate that clients can also take as their CA
               '-addext', 'basicConstraints=critical,CA:TRUE',
               '-addext', 'keyUsage=critical,digitalSignature,keyCertSign',
               '-addext', 'extendedKeyUsage=serverAuth']
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError('openssl could not make a certificate: ' + done.stderr.strip())
    return cert, key


def certificate_names(host, world):
    """The names clients may use: loopback, the nodes' names and addresses, `host`."""
    names = [world.local_node, 'localhost', '127.0.0.1', '::1', *world.nodes,
             *(node['ip'] for node in world.nodes.values() if node.get('ip'))]
    if host not in ('', '0.0.0.0', '::'):
        names.append(host)
    return list(dict.fromkeys(names))


def is_ip(name) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def certificate_fingerprint(cert_file) -> str:
    """SHA-256 of the certificate, as PVE shows it: AB:CD:..."""
    with open(cert_file, encoding='ascii') as file:
        return colon_hex(hashlib.sha256(ssl.PEM_cert_to_DER_cert(file.read())).digest())


def colon_hex(digest) -> str:
    return ':'.join('{:02X}'.format(byte) for byte in digest)


class PveDouble:
    """The double, served from a thread: `with PveDouble(fixture) as pve: pve.url ...`."""

    def __init__(self, fixture_path, host='127.0.0.1', port=0, latency=0.0, cert_dir=None,
                 on_call=None):
        self.host, self.port = host, port
        self.cert_file = self.fingerprint = None
        self._api = Api(fixture_path, latency, on_call)
        self._faults = Faults()
        self._cert_dir = cert_dir
        self._temporary = self._server = None

    @property
    def url(self) -> str:
        host = '[{}]'.format(self.host) if ':' in self.host else self.host
        return 'https://{}:{}'.format(host, self.port)

    @property
    def calls(self):
        """(method, path) of every API request so far, without /api2/json and query."""
        return self._api.calls

    def reset_calls(self):
        self._api.reset_calls()

    @property
    def frozen(self) -> frozenset:
        """The vmids whose file systems are frozen now."""
        return self._api.agents.frozen

    def drop(self, count=1):
        """Handle the next `count` requests, but close their connections
        without an answer."""
        self._faults.drop(count)

    def hang(self):
        """Answer nothing, and do nothing, until answer()."""
        self._faults.hang()

    def answer(self):
        self._faults.answer()

    def start(self):
        cert_dir = self._cert_dir
        if cert_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix='pve-double-')
            cert_dir = self._temporary.name
        names = certificate_names(self.host, self._api.fixture.current())
        self.cert_file, key_file = ensure_certificate(cert_dir, names)
        self.fingerprint = self._api.fingerprint = certificate_fingerprint(self.cert_file)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(self.cert_file, key_file)
        self._server = _TlsServer((self.host, self.port), self._api, tls, self._faults)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,),
                         name='pve-double', daemon=True).start()
        return self

    def stop(self):
        self._faults.answer()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._temporary:
            self._temporary.cleanup()
            self._temporary = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description='Serve a test double of the Proxmox VE API.')
    parser.add_argument('--fixture', required=True,
                        help='the cluster, as JSON; read again whenever it changes')
    parser.add_argument('--bind', default='127.0.0.1', help='address (default: %(default)s)')
    parser.add_argument('--port', type=int, default=8006,
                        help='port, 0 for any free one (default: %(default)s)')
    parser.add_argument('--cert-dir', help='keep the certificate here, to reuse it next time')
    parser.add_argument('--latency', type=float, default=0.0, metavar='SECONDS',
                        help='delay added to every request')
    parser.add_argument('--log-calls', action='store_true',
                        help='print "METHOD PATH" for every API call')
    args = parser.parse_args(argv)
    on_call = (lambda method, path: print(method, path, flush=True)) if args.log_calls else None
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with PveDouble(args.fixture, args.bind, args.port, args.latency, args.cert_dir,
                       on_call) as double:
            print('ready {} fingerprint={}'.format(double.url, double.fingerprint), flush=True)
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
