"""The PVE API double answers as PVE does: shapes, privileges, errors, clients."""

import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.parse
from typing import NamedTuple, Optional

import proxmoxer
import pytest
import requests

import pve_double
import pve_schema
from pve_double import PveDouble, write_fixture

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FIXTURE = os.path.join(HERE, 'fixtures', 'cluster.json')
APIDATA = os.environ.get(
    'PVE_APIDATA', os.path.join(os.path.dirname(__file__), 'fixtures', 'pve-apidata.json'))
PASSWORDS = {'root@pam': 'rootpass', 'planb@pve': 'planbpass',
             'nosys@pve': 'nosyspass', 'novm@pve': 'novmpass', 'restore@pve': 'restorepass'}
TOKEN_ID, TOKEN_SECRET = 'planb@pve!sync', '8a1a3c52-1b1e-4d4e-9b2e-2f6c2b7d9e10'
AGENT_106 = '/nodes/pve1/qemu/106/agent/'
MISSING = "Configuration file 'nodes/{}.conf' does not exist"


class Answer(NamedTuple):
    status: int
    reason: str
    body: Optional[dict]        # None: the body was empty


class Client:
    """Raw HTTPS requests to a double, checking its certificate strictly."""

    def __init__(self, double, headers=()):
        self.double, self.headers = double, dict(headers)
        self.tls = ssl.create_default_context(cafile=double.cert_file)
        self.tls.verify_flags |= ssl.VERIFY_X509_STRICT     # Python 3.13's default

    def request(self, method, path, params=None):
        query, body, headers = '', None, dict(self.headers)
        if method == 'GET':
            query = '?' + urllib.parse.urlencode(params) if params else ''
        else:
            body = urllib.parse.urlencode(params or {})
            headers['Content-Type'] = 'application/x-www-form-urlencoded'
        connection = http.client.HTTPSConnection('127.0.0.1', self.double.port,
                                                 context=self.tls, timeout=10)
        try:
            connection.request(method, '/api2/json' + path + query, body, headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        return Answer(response.status, response.reason, json.loads(raw) if raw else None)

    def get(self, path, **params):
        return self.request('GET', path, params)

    def post(self, path, **params):
        return self.request('POST', path, params)


def login(double, userid, password=None):
    answer = Client(double).post('/access/ticket', username=userid,
                                 password=password or PASSWORDS[userid])
    assert answer.status == 200, answer
    data = answer.body['data']
    return Client(double, {'Cookie': 'PVEAuthCookie=' + urllib.parse.quote(data['ticket']),
                           'CSRFPreventionToken': data['CSRFPreventionToken']})


def token_client(double, token='PVEAPIToken={}={}'.format(TOKEN_ID, TOKEN_SECRET)):
    return Client(double, {'Authorization': token})


def data(answer):
    assert answer.status == 200, answer
    return answer.body['data']


def read_fixture(path=DEFAULT_FIXTURE):
    with open(path, encoding='utf-8') as file:
        return json.load(file)


def guest_of(fixture, vmid):
    return next(g for g in fixture['guests'] if g['vmid'] == vmid)


@pytest.fixture(scope='session')
def cert_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('pve-cert'))


@pytest.fixture(scope='module')
def pve(cert_dir):
    with PveDouble(DEFAULT_FIXTURE, cert_dir=cert_dir) as double:
        yield double


@pytest.fixture
def own_pve(tmp_path, cert_dir):
    """A double of the test's own, on a copy of the default fixture it may rewrite."""
    path = str(tmp_path / 'cluster.json')
    shutil.copy(DEFAULT_FIXTURE, path)
    with PveDouble(path, cert_dir=cert_dir) as double:
        yield double, path


@pytest.fixture(scope='module')
def as_user(pve):
    """Clients logged in to the module's double, one per user."""
    clients = {}

    def client(userid):
        if userid not in clients:
            clients[userid] = login(pve, userid)
        return clients[userid]
    return client


@pytest.fixture(scope='session')
def api_methods():
    return pve_schema.load_methods(APIDATA)


# ==============================================================================
# The answers fit PVE's API schema
# ==============================================================================

def schema_calls():
    """Every call the double serves, once per kind of answer."""
    calls = [('GET', path, params) for path, params in [
        ('/version', {}), ('/nodes', {}), ('/cluster/status', {}), ('/cluster/resources', {}),
        ('/cluster/resources', {'type': 'vm'}), ('/cluster/resources', {'type': 'storage'}),
        ('/cluster/resources', {'type': 'node'}), ('/cluster/resources', {'type': 'sdn'}),
        ('/storage', {}), ('/storage', {'type': 'zfspool'}), ('/pools', {}),
        ('/pools', {'poolid': 'acme'}), ('/pools', {'poolid': 'acme', 'type': 'lxc'})]]
    fixture = read_fixture()
    online = {node['name'] for node in fixture['nodes'] if node['status'] == 'online'}
    calls += [('GET', '/nodes/{}/{}/{}/config'.format(g['node'], g['type'], g['vmid']), {})
              for g in fixture['guests'] if g['node'] in online]
    calls += [('POST', AGENT_106 + command, {}) for command in
              ('fsfreeze-status', 'fsfreeze-freeze', 'fsfreeze-status', 'fsfreeze-thaw')]
    return calls


def schema_problems(api_methods, method, path, value):
    route, _ = pve_double.find_route(method, path)
    returns = api_methods[method, route.path]['returns']
    return ['{} {}: {}'.format(method, path, problem)
            for problem in pve_schema.validate(value, returns)]


@pytest.mark.parametrize('userid', ['root@pam', 'planb@pve', 'nosys@pve'])
def test_every_answer_fits_the_api_schema(own_pve, api_methods, userid):
    double, _ = own_pve
    client = login(double, userid)
    problems, refused = [], []
    for method, path, params in schema_calls():
        answer = client.request(method, path, params)
        if answer.status == 200:
            problems += schema_problems(api_methods, method, path, answer.body['data'])
        else:
            refused.append((path, answer.status))
    assert problems == []
    assert {status for _, status in refused} <= ({403} if userid == 'nosys@pve' else set())


def test_the_ticket_fits_the_api_schema(pve, api_methods):
    answer = Client(pve).post('/access/ticket', username='planb@pve', password='planbpass')
    assert schema_problems(api_methods, 'POST', '/access/ticket', data(answer)) == []


def test_the_ticket(pve):
    ticket = data(Client(pve).post('/access/ticket', username='planb', realm='pve',
                                   password='planbpass'))
    assert re.fullmatch(r'PVE:planb@pve:[0-9A-F]{8}::\S+', ticket['ticket'])
    assert re.fullmatch(r'[0-9A-F]{8}:\S+', ticket['CSRFPreventionToken'])
    assert ticket['clustername'] == 'demo'
    assert ticket['cap']['vms'] == {'VM.Audit': 1, 'VM.GuestAgent.Audit': 1,
                                    'VM.GuestAgent.FileSystemMgmt': 1}
    assert ticket['cap']['dc'] == {'Sys.Audit': 1}
    nosys = data(Client(pve).post('/access/ticket', username='nosys@pve', password='nosyspass'))
    assert 'clustername' not in nosys


@pytest.mark.parametrize('route', pve_double.ROUTES,
                         ids=lambda route: '{} {}'.format(route.method, route.path))
def test_every_route_is_in_the_api_schema(api_methods, route):
    info = api_methods.get((route.method, route.path))
    assert info is not None, 'PVE has no such method'
    assert info.get('allowtoken', 0) == int(route.allowtoken)
    assert (info.get('proxyto') == 'node') == route.proxy
    check = route.check and [list(part) if isinstance(part, tuple) else part
                             for part in route.check]
    assert info['permissions'].get('check') == check
    real = info['parameters'].get('properties', {})
    for name, prop in route.params.items():
        assert {key: real[name].get(key) for key in prop} == prop, name
    assert {name for name, prop in real.items() if not prop.get('optional')} <= set(route.params)


@pytest.mark.parametrize('value, schema, fits', [
    (1, {'type': 'boolean'}, True),
    (True, {'type': 'boolean'}, False),
    (2, {'type': 'boolean'}, False),
    (1.5, {'type': 'integer'}, False),
    ('1', {'type': 'integer'}, False),
    ('c', {'type': 'string', 'enum': ['a', 'b']}, False),
    (99, {'type': 'integer', 'minimum': 100}, False),
    ('g1', {'type': 'string', 'pattern': '[0-9a-f]{2}'}, False),
    ('ab', {'type': 'string', 'pattern': '(?^:[0-9a-f]{2})'}, True),
    ({}, {'type': 'object', 'properties': {'id': {'type': 'string'}}}, False),
    ({'id': 'a'}, {'type': 'object', 'properties': {'id': {'type': 'string'}}}, True),
    ({'x': 1}, {'type': 'object', 'properties': {}}, True),
    ({'x': 1}, {'type': 'object', 'properties': {}, 'additionalProperties': 0}, False),
    ({'scsi0': 1}, {'type': 'object', 'properties': {'scsi[n]': {'type': 'string'}}}, False),
    ([{'id': 1}], {'type': 'array', 'items': {'type': 'object',
                                               'properties': {'id': {'type': 'string'}}}}, False),
])
def test_schema_validator(value, schema, fits):
    assert (pve_schema.validate(value, schema) == []) == fits


# ==============================================================================
# What the default fixture looks like
# ==============================================================================

def test_resources_of_the_default_cluster(as_user):
    resources = data(as_user('root@pam').get('/cluster/resources'))
    by_id = {entry['id']: entry for entry in resources}
    assert set(by_id) == {
        '/pool/acme', 'qemu/100', 'qemu/101', 'qemu/106', 'qemu/107', 'qemu/120', 'lxc/200',
        'node/pve1', 'node/pve2', 'node/pve3',
        'storage/pve1/local', 'storage/pve2/local', 'storage/pve3/local',
        'storage/pve1/local-zfs', 'storage/pve2/local-zfs', 'storage/pve3/local-zfs',
        'storage/pve2/fast-zfs', 'storage/pve1/nfs-backup', 'storage/pve2/nfs-backup',
        'storage/pve3/nfs-backup'}
    assert by_id['node/pve3'] == {'id': 'node/pve3', 'node': 'pve3', 'type': 'node',
                                  'status': 'offline'}
    assert by_id['qemu/120'] == {'id': 'qemu/120', 'vmid': 120, 'node': 'pve3', 'type': 'qemu',
                                 'status': 'unknown'}
    assert by_id['storage/pve3/local-zfs']['status'] == 'unknown'
    assert by_id['storage/pve1/nfs-backup']['shared'] == 1
    acme = by_id['qemu/106']
    assert (acme['name'], acme['status'], acme['pool'], acme['tags']) == (
        'acme-wp', 'running', 'acme', 'prod;web')
    assert acme['uptime'] > 0 and acme['maxmem'] == 2048 << 20 and acme['maxdisk'] == 8 << 20
    assert by_id['qemu/100']['template'] == 1 and by_id['qemu/100']['uptime'] == 0
    assert by_id['lxc/200']['maxdisk'] == 64 << 20


def test_pools_and_pool_field_need_pool_audit(as_user):
    planb = data(as_user('planb@pve').get('/cluster/resources'))
    assert not any(entry['type'] == 'pool' or 'pool' in entry for entry in planb)
    assert data(as_user('planb@pve').get('/pools')) == []
    assert data(as_user('root@pam').get('/pools')) == [{'poolid': 'acme', 'comment': 'ACME Corp'}]
    [acme] = data(as_user('planb@pve').get('/pools', poolid='acme'))
    assert [member['id'] for member in acme['members']] == ['qemu/106']


def test_typed_resources(as_user):
    planb = as_user('planb@pve')
    assert {e['type'] for e in data(planb.get('/cluster/resources', type='vm'))} == {'qemu', 'lxc'}
    assert len(data(planb.get('/cluster/resources', type='node'))) == 3
    assert len(data(planb.get('/cluster/resources', type='storage'))) == 10
    assert data(planb.get('/cluster/resources', type='sdn')) == []


def test_guests_need_vm_audit(as_user):
    resources = data(as_user('novm@pve').get('/cluster/resources'))
    assert {entry['type'] for entry in resources} == {'node', 'storage'}


def test_nodes_without_sys_audit_come_without_figures(as_user):
    nodes = {node['node']: node for node in data(as_user('nosys@pve').get('/nodes'))}
    assert set(nodes['pve1']) == {'id', 'node', 'type', 'status', 'level', 'ssl_fingerprint'}
    assert set(nodes['pve3']) == {'id', 'node', 'type', 'status', 'ssl_fingerprint'}


def test_the_answering_node_shows_the_double_s_fingerprint(pve, as_user):
    nodes = data(as_user('planb@pve').get('/nodes'))
    assert nodes[0]['ssl_fingerprint'] == pve.fingerprint
    assert len({node['ssl_fingerprint'] for node in nodes}) == 3


def test_cluster_status(as_user):
    cluster, *nodes = data(as_user('planb@pve').get('/cluster/status'))
    assert cluster == {'type': 'cluster', 'id': 'cluster', 'name': 'demo', 'nodes': 3,
                       'version': 3, 'quorate': 1}
    assert [(n['name'], n['ip'], n['online'], n['local']) for n in nodes] == [
        ('pve1', '10.99.1.1', 1, 1), ('pve2', '10.99.2.1', 1, 0), ('pve3', '10.99.3.1', 0, 0)]


def test_storage_config(as_user):
    storages = data(as_user('planb@pve').get('/storage'))
    fixture = read_fixture()['storage']
    assert sorted(fixture, key=lambda s: s['storage']) == [
        {key: value for key, value in entry.items() if key != 'digest'} for entry in storages]
    assert len({entry['digest'] for entry in storages}) == 1
    assert [s['storage'] for s in data(as_user('planb@pve').get('/storage', type='nfs'))] == [
        'nfs-backup']


@pytest.mark.parametrize('vmid', [100, 101, 106, 107, 200])
def test_guest_config_is_the_fixture_s_with_a_digest(as_user, vmid):
    guest = guest_of(read_fixture(), vmid)
    path = '/nodes/{node}/{type}/{vmid}/config'.format(**guest)
    config = data(as_user('planb@pve').get(path))
    assert re.fullmatch('[0-9a-f]{40}', config.pop('digest'))
    assert config == guest['config']


def test_storage_needs_datastore_audit(own_pve):
    double, path = own_pve
    fixture = read_fixture(path)
    fixture['users'].append({'userid': 'nostore@pve', 'password': 'nostorepass',
                             'privileges': ['VM.Audit', 'Sys.Audit']})
    write_fixture(path, fixture)
    client = login(double, 'nostore@pve', 'nostorepass')
    assert data(client.get('/storage')) == []
    assert data(client.get('/cluster/resources', type='storage')) == []


def test_a_standalone_node(tmp_path, cert_dir):
    path = str(tmp_path / 'solo.json')
    write_fixture(path, {'cluster': None,
                         'nodes': [{'name': 'solo', 'ip': '192.0.2.7', 'status': 'online'}],
                         'users': [{'userid': 'root@pam', 'password': 'rootpass'}]})
    with PveDouble(path, cert_dir=str(tmp_path)) as double:
        answer = Client(double).post('/access/ticket', username='root', realm='pam',
                                     password='rootpass')
        assert 'clustername' not in data(answer)
        assert data(login(double, 'root@pam').get('/cluster/status')) == [
            {'type': 'node', 'id': 'node/solo', 'name': 'solo', 'nodeid': 0, 'local': 1,
             'online': 1, 'ip': '192.0.2.7', 'level': ''}]


def test_a_fixture_with_an_unknown_privilege_is_refused(tmp_path):
    fixture = read_fixture()
    fixture['users'][1]['privileges'].append('VM.Adit')
    path = str(tmp_path / 'typo.json')
    write_fixture(path, fixture)
    with pytest.raises(pve_double.FixtureError, match='VM.Adit'):
        PveDouble(path, cert_dir=str(tmp_path)).start()


# ==============================================================================
# Errors come as PVE sends them
# ==============================================================================

def test_no_credentials_no_ticket(pve):
    assert Client(pve).get('/nodes') == Answer(401, 'No ticket', None)


@pytest.mark.parametrize('headers', [
    {'Cookie': 'PVEAuthCookie=PVE:planb@pve:{:08X}::forged'.format(int(time.time()))},
    {'Authorization': 'PVEAPIToken={}=wrong'.format(TOKEN_ID)},
    {'Authorization': 'PVEAPIToken=planb@pve!nosuch={}'.format(TOKEN_SECRET)},
    {'Authorization': 'PVEAPIToken=garbage'},
])
def test_bad_credentials_fail_without_delay(pve, headers):
    started = time.monotonic()
    assert Client(pve, headers).get('/nodes') == Answer(401, 'Authentication failed!', None)
    assert time.monotonic() - started < 1


def test_wrong_password(pve):
    answer = Client(pve).post('/access/ticket', username='planb@pve', password='nope')
    assert answer == Answer(401, 'authentication failure',
                            {'data': None, 'message': 'authentication failure\n'})


@pytest.mark.parametrize('token', [
    'PVEAPIToken={}={}'.format(TOKEN_ID, TOKEN_SECRET),
    'PVEAPIToken {}={}'.format(TOKEN_ID, TOKEN_SECRET),
])
def test_api_token_forms(pve, token):
    assert len(data(token_client(pve, token).get('/nodes'))) == 3


def test_the_token_id_ends_at_the_last_equal_sign(own_pve):
    double, path = own_pve
    fixture = read_fixture(path)
    fixture['users'][1]['tokens'][0]['secret'] = 'a=b'
    write_fixture(path, fixture)
    answer = token_client(double, 'PVEAPIToken={}=a=b'.format(TOKEN_ID)).get('/version')
    assert answer == Answer(401, 'Authentication failed!', None)


def test_tokens_cannot_create_tickets(pve):
    answer = token_client(pve).post('/access/ticket', username='planb@pve', password='planbpass')
    assert answer.status == 403
    assert answer.reason == ("Permission check failed (URI '/access/ticket' not available "
                             "with API token, need proper ticket.")


@pytest.mark.parametrize('userid, path, what', [
    ('nosys@pve', '/cluster/status', '/, Sys.Audit'),
    ('novm@pve', '/nodes/pve1/qemu/106/config', '/vms/106, VM.Audit'),
    ('novm@pve', '/nodes/pve2/lxc/200/config', '/vms/200, VM.Audit'),
])
def test_missing_privilege(as_user, userid, path, what):
    message = 'Permission check failed ({})'.format(what)
    assert as_user(userid).get(path) == Answer(403, message,
                                               {'data': None, 'message': message + '\n'})


def test_fsfreeze_privilege(as_user):
    answer = as_user('nosys@pve').post(AGENT_106 + 'fsfreeze-freeze')
    assert answer.status == 403
    assert answer.reason == ('Permission check failed (/vms/106, '
                             'VM.GuestAgent.FileSystemMgmt|VM.GuestAgent.Unrestricted)')


@pytest.mark.parametrize('path, message', [
    ('/nodes/pve1/qemu/999/config', MISSING.format('pve1/qemu-server/999')),
    ('/nodes/pve2/qemu/106/config', MISSING.format('pve2/qemu-server/106')),
    ('/nodes/pve2/qemu/200/config', MISSING.format('pve2/qemu-server/200')),
    ('/nodes/pve1/lxc/999/config', MISSING.format('pve1/lxc/999')),
    ('/nodes/pve9/qemu/106/config', "hostname lookup 'pve9' failed - failed to get address info "
                                    "for: pve9: Name or service not known"),
])
def test_server_errors(as_user, path, message):
    assert as_user('planb@pve').get(path) == Answer(500, message,
                                                    {'data': None, 'message': message + '\n'})


def test_an_offline_node_cannot_be_reached(as_user):
    answer = as_user('planb@pve').get('/nodes/pve3/qemu/120/config')
    assert answer == Answer(595, 'No route to host', None)


@pytest.mark.parametrize('method, path, params, errors', [
    ('GET', '/cluster/resources', {'type': 'vms'},
     {'type': "value 'vms' does not have a value in the enumeration 'vm, storage, node, sdn'"}),
    ('GET', '/nodes/pve1/qemu/abc/config', {},
     {'vmid': "type check ('integer') failed - got 'abc'"}),
    ('GET', '/nodes/pve1/qemu/99/config', {}, {'vmid': 'value must have a minimum value of 100'}),
    ('GET', '/nodes', {'full': '1'}, {'full': 'property is not defined in schema and the '
                                              'schema does not allow additional properties'}),
    ('GET', '/pools', {'type': 'lxc'}, {'poolid': "missing property required by 'type'"}),
    ('POST', '/access/ticket', {'username': 'planb@pve'},
     {'password': 'property is missing and it is not optional'}),
])
def test_parameter_errors(as_user, method, path, params, errors):
    answer = as_user('planb@pve').request(method, path, params)
    assert answer == Answer(400, 'Parameter verification failed.',
                            {'data': None, 'message': 'Parameter verification failed.\n',
                             'errors': errors})


def test_unknown_path(as_user):
    message = "Method 'GET /nodes/pve1/qemu' not implemented"
    assert as_user('planb@pve').get('/nodes/pve1/qemu') == Answer(
        501, message, {'data': None, 'message': message})


def test_outside_the_api(pve):
    response = requests.get(pve.url + '/index.html', verify=pve.cert_file, timeout=5)
    assert (response.status_code, response.reason) == (500, "no such file '/index.html'")


def test_parameters_may_come_as_json(pve):
    response = requests.post(pve.url + '/api2/json/access/ticket', verify=pve.cert_file,
                             json={'username': 'planb@pve', 'password': 'planbpass'}, timeout=5)
    assert response.json()['data']['username'] == 'planb@pve'


def test_post_with_a_ticket_needs_the_csrf_token(as_user, own_pve):
    double, _ = own_pve
    client = login(double, 'planb@pve')
    for token in (None, 'ABCDEF12:forged'):
        headers = {'CSRFPreventionToken': token} if token else {}
        bare = Client(double, {'Cookie': client.headers['Cookie'], **headers})
        assert bare.post(AGENT_106 + 'fsfreeze-status') == Answer(
            401, 'Permission denied - invalid csrf token', None)
    assert data(client.post(AGENT_106 + 'fsfreeze-status')) == {'result': 'thawed'}
    assert data(token_client(double).post(AGENT_106 + 'fsfreeze-status')) == {'result': 'thawed'}


def test_a_ticket_renews_itself(pve):
    ticket = data(Client(pve).post('/access/ticket', username='planb@pve', password='planbpass'))
    renewed = Client(pve).post('/access/ticket', username='planb@pve', password=ticket['ticket'])
    assert data(renewed)['username'] == 'planb@pve'
    other = Client(pve).post('/access/ticket', username='nosys@pve', password=ticket['ticket'])
    assert other.status == 401


# ==============================================================================
# The guest agent
# ==============================================================================

def test_fsfreeze_cycle(own_pve):
    double, _ = own_pve
    client = login(double, 'planb@pve')
    assert data(client.post(AGENT_106 + 'fsfreeze-freeze')) == {'result': 2}
    assert double.frozen == {106}
    assert data(client.post(AGENT_106 + 'fsfreeze-status')) == {'result': 'frozen'}
    again = client.post(AGENT_106 + 'fsfreeze-freeze')
    assert again.status == 500 and 'frozen state' in again.reason
    assert data(client.post(AGENT_106 + 'fsfreeze-thaw')) == {'result': 2}
    assert data(client.post(AGENT_106 + 'fsfreeze-thaw')) == {'result': 0}
    assert double.frozen == frozenset()


@pytest.mark.parametrize('change, path, message', [
    ({}, '/nodes/pve2/qemu/107/agent/fsfreeze-freeze', 'No QEMU guest agent configured'),
    ({}, '/nodes/pve1/qemu/100/agent/fsfreeze-freeze', 'No QEMU guest agent configured'),
    ({'status': 'stopped'}, AGENT_106 + 'fsfreeze-freeze', 'VM 106 is not running'),
    ({'agent_running': False}, AGENT_106 + 'fsfreeze-freeze', 'QEMU guest agent is not running'),
    ({'config': {'agent': '0'}}, AGENT_106 + 'fsfreeze-freeze', 'QEMU guest agent is not running'),
    ({}, '/nodes/pve2/qemu/200/agent/fsfreeze-freeze', MISSING.format('pve2/qemu-server/200')),
])
def test_agent_errors(own_pve, change, path, message):
    double, fixture_path = own_pve
    fixture = read_fixture(fixture_path)
    guest = guest_of(fixture, 106)
    guest['config'].update(change.pop('config', {}))
    guest.update(change)
    write_fixture(fixture_path, fixture)
    answer = token_client(double).post(path)
    assert (answer.status, answer.reason) == (500, message)


# ==============================================================================
# proxmoxer, and certificate checks
# ==============================================================================

def test_proxmoxer_with_a_password(pve):
    api = proxmoxer.ProxmoxAPI('127.0.0.1', port=pve.port, user='planb@pve',
                               password='planbpass', verify_ssl=pve.cert_file)
    assert [node['node'] for node in api.nodes.get()] == ['pve1', 'pve2', 'pve3']


def test_proxmoxer_with_a_token(pve):
    api = proxmoxer.ProxmoxAPI('127.0.0.1', port=pve.port, user='planb@pve', token_name='sync',
                               token_value=TOKEN_SECRET, verify_ssl=pve.cert_file)
    assert api.nodes('pve1').qemu(106).config.get()['name'] == 'acme-wp'


def test_proxmoxer_posts_with_its_csrf_token(own_pve):
    double, _ = own_pve
    api = proxmoxer.ProxmoxAPI('127.0.0.1', port=double.port, user='planb@pve',
                               password='planbpass', verify_ssl=double.cert_file)
    assert api.nodes('pve1').qemu(106).agent('fsfreeze-freeze').post() == {'result': 2}


def test_proxmoxer_wrong_password(pve):
    with pytest.raises(proxmoxer.AuthenticationError):
        proxmoxer.ProxmoxAPI('127.0.0.1', port=pve.port, user='planb@pve', password='nope',
                             verify_ssl=pve.cert_file)


def test_proxmoxer_permission_denied(pve):
    api = proxmoxer.ProxmoxAPI('127.0.0.1', port=pve.port, user='nosys@pve',
                               password='nosyspass', verify_ssl=pve.cert_file)
    with pytest.raises(proxmoxer.core.ResourceException) as caught:
        api.cluster.status.get()
    assert caught.value.status_code == 403
    assert caught.value.content == 'Permission check failed (/, Sys.Audit)'


@pytest.mark.filterwarnings('ignore::urllib3.exceptions.InsecureRequestWarning')
@pytest.mark.parametrize('host', ['127.0.0.1', 'localhost'])
def test_proxmoxer_without_verification(pve, host):
    api = proxmoxer.ProxmoxAPI(host, port=pve.port, user='planb@pve', password='planbpass',
                               verify_ssl=False)
    assert api.version.get()['release'] == '9.1'


def test_the_certificate_names_loopback_and_the_nodes(pve):
    response = requests.get('https://localhost:{}/api2/json/version'.format(pve.port),
                            verify=pve.cert_file, timeout=5)
    assert response.status_code == 401
    with open(pve.cert_file, encoding='ascii') as file:
        der = ssl.PEM_cert_to_DER_cert(file.read())
    for name in (b'pve1', b'pve3', b'localhost', bytes([10, 99, 2, 1])):
        assert name in der


def test_an_untrusted_certificate_is_refused(pve):
    with pytest.raises(requests.exceptions.SSLError):
        proxmoxer.ProxmoxAPI('127.0.0.1', port=pve.port, user='planb@pve', password='planbpass',
                             verify_ssl=True)


# ==============================================================================
# The double itself: reloading, calls, latency, command line
# ==============================================================================

def test_a_rewritten_fixture_is_served(own_pve):
    double, path = own_pve
    client = login(double, 'root@pam')

    def node_of_106():
        return next(entry['node'] for entry in data(client.get('/cluster/resources', type='vm'))
                    if entry['vmid'] == 106)

    assert node_of_106() == 'pve1'
    fixture = read_fixture(path)
    guest_of(fixture, 106)['node'] = 'pve2'
    write_fixture(path, fixture)
    assert node_of_106() == 'pve2'
    assert client.get('/nodes/pve1/qemu/106/config').status == 500
    assert data(client.get('/nodes/pve2/qemu/106/config'))['name'] == 'acme-wp'
    fixture['nodes'][1]['status'] = 'offline'
    write_fixture(path, fixture)
    assert client.get('/nodes/pve2/qemu/106/config').status == 595


def test_calls_are_recorded(own_pve):
    double, _ = own_pve
    client = token_client(double)
    client.get('/cluster/resources', type='vm')
    client.get('/nodes/pve3/qemu/120/config')
    client.post(AGENT_106 + 'fsfreeze-status')
    Client(double).get('/nowhere')
    assert double.calls == [('GET', '/cluster/resources'), ('GET', '/nodes/pve3/qemu/120/config'),
                            ('POST', AGENT_106 + 'fsfreeze-status'), ('GET', '/nowhere')]
    double.reset_calls()
    assert double.calls == []


def test_dropped_connections_are_handled_but_not_answered(own_pve):
    double, _ = own_pve
    client = token_client(double)
    double.drop(2)
    for _ in range(2):
        with pytest.raises(http.client.RemoteDisconnected):
            client.get('/version')
    assert data(client.get('/version'))['release'] == '9.1'
    assert double.calls == [('GET', '/version')] * 3


def test_a_hanging_double_answers_nothing_until_told(own_pve):
    double, _ = own_pve
    double.hang()
    connection = http.client.HTTPSConnection(
        '127.0.0.1', double.port, context=ssl.create_default_context(cafile=double.cert_file),
        timeout=0.5)
    try:
        connection.request('GET', '/api2/json/version')
        with pytest.raises(TimeoutError):
            connection.getresponse()
    finally:
        connection.close()
    assert double.calls == []
    double.answer()
    assert token_client(double).get('/version').status == 200


def test_latency_is_added_to_concurrent_requests(cert_dir):
    with PveDouble(DEFAULT_FIXTURE, latency=0.2, cert_dir=cert_dir) as double:
        client = token_client(double)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.get('/version'), range(8)))
        elapsed = time.monotonic() - started
    assert {answer.status for answer in answers} == {200}
    assert 0.2 <= elapsed < 0.8


def test_command_line(pve, cert_dir):
    process = subprocess.Popen(
        [sys.executable, pve_double.__file__, '--fixture', DEFAULT_FIXTURE, '--port', '0',
         '--cert-dir', cert_dir], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        ready = re.fullmatch(r'ready https://127\.0\.0\.1:(\d+) fingerprint=(\S+)\n', line)
        assert ready, line
        pem = ssl.get_server_certificate(('127.0.0.1', int(ready[1])))
    finally:
        process.terminate()
        returncode = process.wait(5)
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    assert ready[2] == ':'.join(re.findall('..', digest))
    assert ready[2] == pve.fingerprint      # the certificate in --cert-dir was reused
    assert returncode == 0


@pytest.mark.parametrize('kind, config, answer', [
    ('qemu', {'vmgenid': '1'}, (500, "only root can set 'vmgenid' config")),
    ('qemu', {'args': '-cpu host'}, (500, "only root can set 'args' config")),
    ('qemu', {'serial0': '/dev/ttyS0'}, (500, "only root can set 'serial0' config for real "
                                              "devices")),
    ('qemu', {'hostpci0': '0000:01:00.0'}, (500, "only root can set 'hostpci0' config for "
                                                 "non-mapped devices")),
    ('lxc', {'hookscript': 'local:snippets/x.pl'},
     (403, 'Permission check failed (changing the hookscript is only allowed for root@pam)')),
    ('lxc', {'features': 'nesting=1,keyctl=1'},
     (403, 'Permission check failed (changing feature flags (except nesting) is only allowed '
           'for root@pam)')),
])
def test_keys_only_root_may_set_are_refused_to_others(own_pve, kind, config, answer):
    """As qemu-server's and pve-container's create calls answer them."""
    double, path = own_pve
    fixture = read_fixture(path)
    fixture['templates'] = {'pve1/local': ['debian-12.tar.zst']}
    pve_double.write_fixture(path, fixture)
    create = dict(vmid=9400, memory=512, **config)
    if kind == 'lxc':
        create.update(ostemplate='local:vztmpl/debian-12.tar.zst', unprivileged=1)
    where = '/nodes/pve1/' + kind
    refused = login(double, 'restore@pve').post(where, **create)
    assert (refused.status, refused.reason) == answer
    assert login(double, 'root@pam').post(where, **create).status == 200
