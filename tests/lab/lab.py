#!/usr/bin/env python3
"""Boot and drive the planb-pvesync test lab: three Debian 12 + OpenZFS VMs under qemu.

pve1 and pve2 play Proxmox VE nodes (pool `rpool` with `rpool/data`), backup plays the
backup host (pool `tank` with the encrypted `tank/enc`). Each PVE node has a
point-to-point link to backup (qemu socket netdevs on loopback); backup routes between
them. The test machine reaches each VM's sshd through a port forwarded on 127.0.0.1.

    python3 tests/lab/lab.py up      # build the image if needed, boot, print how to log in
    python3 tests/lab/lab.py down    # stop the VMs of `up`
"""
import argparse
import atexit
import concurrent.futures
import ctypes
import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
BUILD_IMAGE = LAB_DIR / 'build-image'
DEFAULT_STATE_DIR = Path('/var/tmp/planb-pvesync-lab')
TOOL_DIR = '/opt/planb-pvesync'
TOOL_WRAPPER = '/usr/local/bin/planb-pvesync'
HOST_KEY_ALIAS = 'planb-lab'  # the name build-image gives the shared host key in known_hosts
BOOT_TIMEOUT = int(os.environ.get('PLANB_LAB_BOOT_TIMEOUT', 180))   # seconds; more on a busy machine
MEMORY_MIB = 1024
SMP = 1

# Subnet of each PVE node's link to backup: the node is .1, backup is .2.
SUBNETS = {'pve1': '10.99.1', 'pve2': '10.99.2'}
# Sparse files. The suite's zvols are thick (refreserved) and add up over a session: at 512 MiB
# pve1's pool filled near the end of a CI run.
POOL_DISK_MIB = {'pve1': 2048, 'pve2': 2048, 'backup': 3072}
HOST_NAMES = ('backup', 'pve1', 'pve2')  # backup first: its link sockets listen


def build_image(bench=False):
    """Build the VM image unless it is cached; return its directory. With `bench`,
    the image that also has the peers of make bench."""
    result = subprocess.run([str(BUILD_IMAGE), *(['--bench'] if bench else [])],
                            stdout=subprocess.PIPE, text=True, check=True)
    return Path(result.stdout.strip().splitlines()[-1])


def address(name, seen_from):
    """The address by which `seen_from` reaches host `name`."""
    if name == 'backup':
        return SUBNETS.get(seen_from, SUBNETS['pve1']) + '.2'
    return SUBNETS[name] + '.1'


def link_mac(subnet, end):
    return '52:54:00:99:%02x:%02x' % (int(subnet.rsplit('.', 1)[1]), end)


def free_ports(count):
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(('127.0.0.1', 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def is_listening(port):
    with open('/proc/net/tcp') as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == '0A' and int(local.split(':')[1], 16) == port:
                return True
    return False


def die_with_parent():
    """Runs in the forked qemu: get SIGTERM when the process (thread) that started it ends."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def each(fn, items):
    """fn(item) for every item in parallel; re-raises the first failure (or Ctrl-C) without waiting for the rest."""
    pool = concurrent.futures.ThreadPoolExecutor(len(items))
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class RemoteCommandError(subprocess.CalledProcessError):
    def __init__(self, host, user, proc):
        super().__init__(proc.returncode, proc.args[-1], proc.stdout, proc.stderr)
        self.host, self.user = host, user

    def __str__(self):
        return (f'{self.user}@{self.host}: {self.cmd!r} exited with {self.returncode}\n'
                f'stderr: {self.stderr.strip()}\nstdout: {self.stdout.strip()[-2000:]}')


class Host:
    """One lab VM, driven over ssh (as root or planb, both with the lab's test key)."""

    def __init__(self, name, state_dir):
        self.name = name
        self.ssh_port = None  # set when the lab starts
        self.state_dir = Path(state_dir)
        self.pidfile = self.state_dir / f'{name}.pid'
        self.serial_log = self.state_dir / f'{name}.serial.log'
        self.process = None

    def ssh_argv(self, user='root'):
        """The ssh command prefix to run a command as `user` on this VM."""
        return ['ssh', '-F', str(self.state_dir / 'ssh_config'), '-l', user, self.name]

    def run(self, cmd, user='root', check=True, input=None, timeout=300):
        """Run shell command string `cmd` on the VM; stdout/stderr come back as text."""
        if isinstance(input, str):
            input = input.encode()
        proc = subprocess.run(self.ssh_argv(user) + [cmd], input=input, capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL if input is None else None)
        proc.stdout = proc.stdout.decode(errors='replace')
        proc.stderr = proc.stderr.decode(errors='replace')
        if check and proc.returncode != 0:
            raise RemoteCommandError(self.name, user, proc)
        return proc

    def put(self, local_path, remote_path, user='root'):
        self.run(f'cat > {shlex.quote(str(remote_path))}', user=user, input=Path(local_path).read_bytes())

    def zfs(self, args):
        """`zfs ARGS` as root; returns stdout without the trailing newline."""
        return self.run('zfs ' + args).stdout.rstrip('\n')

    def write_random(self, zvol, mib, seed=None, offset_mib=0):
        """Write `mib` MiB of random data (reproducible when seeded) into zvol NAME at offset_mib."""
        device = shlex.quote(f'/dev/zvol/{zvol}')
        source = ('cat /dev/urandom' if seed is None else
                  f'openssl enc -aes-256-ctr -nosalt -pass pass:{shlex.quote(str(seed))} -in /dev/zero 2>/dev/null')
        self.run(f'{wait_for_device(device)} && {source} | dd of={device} bs=1M count={mib} seek={offset_mib}'
                 ' iflag=fullblock conv=notrunc,fsync status=none')

    def sha256(self, path):
        """Hex sha256 of a file or block device on the VM."""
        quoted = shlex.quote(path)
        waiting = wait_for_device(quoted) + ' && ' if path.startswith('/dev/') else ''
        return self.run(f'{waiting}sha256sum {quoted}').stdout.split()[0]

    def start(self, argv, keep_running):
        with open(self.state_dir / f'{self.name}.qemu.log', 'wb') as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            preexec_fn=None if keep_running else die_with_parent)

    def qemu_pid(self):
        """PID of this VM's qemu if it runs, checked against its command line."""
        try:
            pid = int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):  # not written yet, or never started
            return self.process.pid if self.process and self.process.poll() is None else None
        try:
            cmdline = Path(f'/proc/{pid}/cmdline').read_bytes()
        except FileNotFoundError:
            return None
        return pid if str(self.pidfile).encode() in cmdline else None

    def stop(self):
        subprocess.run(self.ssh_argv() + ['-O', 'exit'], capture_output=True, timeout=10)
        pid = self.qemu_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not self._wait_exit(pid, 10):
                os.kill(pid, signal.SIGKILL)
        if self.process:
            self.process.wait()
        self.pidfile.unlink(missing_ok=True)

    def _wait_exit(self, pid, timeout):
        if self.process and self.process.pid == pid:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return wait_gone(pid, timeout)

    def serial_tail(self, lines=30):
        try:
            return '\n'.join(self.serial_log.read_text(errors='replace').splitlines()[-lines:])
        except FileNotFoundError:
            return '(no serial log)'


def wait_for_device(quoted_path):
    """Shell snippet: wait until udev made the device node (zvol minors appear asynchronously)."""
    return f"udevadm settle && timeout 30 sh -c 'until [ -e \"$0\" ]; do sleep 0.1; done' {quoted_path}"


def wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while os.path.exists(f'/proc/{pid}') and time.monotonic() < deadline:
        time.sleep(0.1)
    return not os.path.exists(f'/proc/{pid}')


class Lab:
    """The three VMs pve1, pve2, backup.

    Unless keep_running, the VMs stop with this process: by stop(), at exit, or, if the
    process is killed, by the kernel (PR_SET_PDEATHSIG; so call start() from a thread that
    lives as long as the lab, e.g. the main thread).
    """

    def __init__(self, state_dir, image_dir=None, keep_running=False):
        self.state_dir = Path(state_dir)
        self.image_dir = Path(image_dir) if image_dir else None
        self.keep_running = keep_running
        self.hosts = {name: Host(name, self.state_dir) for name in HOST_NAMES}
        self.pve1, self.pve2, self.backup = self.hosts['pve1'], self.hosts['pve2'], self.hosts['backup']

    def __getitem__(self, name):
        return self.hosts[name]

    def start(self):
        """Boot the VMs, wait for ssh, configure the links and create fresh pools."""
        if self.image_dir is None:
            self.image_dir = build_image()
        if not self.keep_running:
            atexit.register(self.stop)
        self._prepare_state_dir()
        started = time.monotonic()
        self._boot()
        each(self._wait_for_ssh, list(self.hosts.values()))
        print(f'lab: 3 VMs up in {time.monotonic() - started:.0f}s', file=sys.stderr)
        each(self._configure_network, list(self.hosts.values()))
        self.create_pools()

    def running(self):
        return any(host.qemu_pid() for host in self.hosts.values())

    def stop(self):
        """Stop every VM by its PID. Safe to call more than once."""
        for host in self.hosts.values():
            host.stop()

    def create_pools(self):
        """(Re)create empty pools: rpool + rpool/data on pve1/pve2, tank + encrypted tank/enc on backup."""
        each(create_pool, list(self.hosts.values()))

    def install_tool(self, repo_root):
        """Copy planb_pvesync.py (if present) and proxmoxer to /opt/planb-pvesync on every VM,
        compiled and started as pip's console script starts it (a script run as `python3 FILE`
        would be compiled anew on every run)."""
        payload = tool_tarball(Path(repo_root))
        main = 'import sys, planb_pvesync; sys.exit(planb_pvesync.main())'
        wrapper = f'#!/bin/sh\nPYTHONPATH={TOOL_DIR} exec python3 -c {shlex.quote(main)} "$@"\n'
        script = (f'rm -rf {TOOL_DIR} && mkdir -p {TOOL_DIR} && tar -x -C {TOOL_DIR}'
                  f' && python3 -m compileall -q {TOOL_DIR}'
                  f' && printf %s {shlex.quote(wrapper)} > {TOOL_WRAPPER} && chmod 755 {TOOL_WRAPPER}')
        each(lambda host: host.run(script, input=payload), list(self.hosts.values()))

    def login_help(self):
        config = self.state_dir / 'ssh_config'
        lines = [f'ssh -F {config} {name}    # or -l planb; port {host.ssh_port}, key {self.state_dir}/id_lab'
                 for name, host in self.hosts.items()]
        return '\n'.join(lines + [f'serial logs: {self.state_dir}/*.serial.log',
                                  f'stop: python3 {Path(__file__).resolve()} down --state-dir {self.state_dir}'])

    def _prepare_state_dir(self):
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.state_dir.mkdir(parents=True)
        for host, port in zip(self.hosts.values(), free_ports(len(self.hosts))):
            host.ssh_port = port
        # Own copies, so that a rebuild pruning the image directory does not lock us out.
        shutil.copy2(self.image_dir / 'id_lab', self.state_dir / 'id_lab')
        shutil.copy2(self.image_dir / 'known_hosts', self.state_dir / 'known_hosts')
        self._write_ssh_config()
        for name, host in self.hosts.items():
            subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b',
                            str(self.image_dir / 'rootfs.img'), str(self.state_dir / f'{name}-root.qcow2')],
                           check=True)
            with open(self.state_dir / f'{name}-pool.raw', 'wb') as disk:
                disk.truncate(POOL_DISK_MIB[name] << 20)

    def _write_ssh_config(self):
        common = f"""Host {' '.join(self.hosts)}
  HostName 127.0.0.1
  User root
  IdentityFile {self.state_dir}/id_lab
  IdentitiesOnly yes
  BatchMode yes
  UserKnownHostsFile {self.state_dir}/known_hosts
  HostKeyAlias {HOST_KEY_ALIAS}
  StrictHostKeyChecking yes
  ControlMaster auto
  ControlPath {self.state_dir}/ssh-%n-%r
  ControlPersist 300
  ConnectTimeout 10
  ServerAliveInterval 15
  LogLevel ERROR
"""
        ports = ''.join(f'Host {name}\n  Port {host.ssh_port}\n' for name, host in self.hosts.items())
        (self.state_dir / 'ssh_config').write_text(common + ports)

    def _boot(self):
        link_ports = dict(zip(SUBNETS, free_ports(len(SUBNETS))))
        backup = self.backup
        backup.start(self._qemu_argv(backup, [
            ('listen', link_ports[node], link_mac(subnet, 2)) for node, subnet in SUBNETS.items()]),
            self.keep_running)
        deadline = time.monotonic() + 30
        while not all(map(is_listening, link_ports.values())):
            if backup.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'qemu of backup did not open its link sockets:\n{self._qemu_log(backup)}')
            time.sleep(0.05)
        for node, subnet in SUBNETS.items():
            host = self.hosts[node]
            host.start(self._qemu_argv(host, [('connect', link_ports[node], link_mac(subnet, 1))]),
                       self.keep_running)

    def _qemu_argv(self, host, links):
        accel = (['-accel', 'kvm', '-cpu', 'host'] if os.environ.get('PLANB_LAB_ACCEL') == 'kvm'
                 else ['-accel', 'tcg,thread=multi,tb-size=512', '-cpu', 'max'])
        state = self.state_dir
        argv = ['qemu-system-x86_64', '-name', host.name, '-nodefaults', '-display', 'none', '-no-reboot',
                *accel, '-smp', str(SMP), '-m', str(MEMORY_MIB),
                '-kernel', str(self.image_dir / 'vmlinuz'), '-initrd', str(self.image_dir / 'initrd.img'),
                '-append', f'root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet panic=-1 systemd.hostname={host.name}',
                '-drive', f'file={state}/{host.name}-root.qcow2,if=virtio,format=qcow2,cache=unsafe',
                '-drive', f'file={state}/{host.name}-pool.raw,if=virtio,format=raw,cache=unsafe',
                '-netdev', f'user,id=user,restrict=on,hostfwd=tcp:127.0.0.1:{host.ssh_port}-:22',
                '-device', 'virtio-net-pci,netdev=user,romfile=',
                '-serial', f'file:{host.serial_log}', '-pidfile', str(host.pidfile)]
        for i, (mode, port, mac) in enumerate(links):
            argv += ['-netdev', f'socket,id=link{i},{mode}=127.0.0.1:{port}',
                     '-device', f'virtio-net-pci,netdev=link{i},mac={mac},romfile=']
        return argv

    def _wait_for_ssh(self, host):
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if host.process.poll() is not None:
                raise RuntimeError(f'qemu of {host.name} exited:\n{self._qemu_log(host)}\n{host.serial_tail()}')
            try:
                if host.run('true', check=False, timeout=20).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f'no ssh to {host.name} after {BOOT_TIMEOUT}s; serial log tail:\n'
                                   f'{host.serial_tail()}')
            time.sleep(1)

    def _qemu_log(self, host):
        return (self.state_dir / f'{host.name}.qemu.log').read_text(errors='replace')

    def _configure_network(self, host):
        host.run(network_script(host.name))


def network_script(name):
    """Shell script giving VM `name` its link addresses, routes and /etc/hosts."""
    lines = ['set -e', 'nic() { grep -l "$1" /sys/class/net/*/address | cut -d/ -f5; }']
    if name == 'backup':
        for subnet in SUBNETS.values():
            lines += [f'dev=$(nic {link_mac(subnet, 2)})', f'ip addr add {subnet}.2/24 dev "$dev"',
                      'ip link set "$dev" up']
        lines.append('sysctl -qw net.ipv4.ip_forward=1')
    else:
        subnet = SUBNETS[name]
        lines += [f'dev=$(nic {link_mac(subnet, 1)})', f'ip addr add {subnet}.1/24 dev "$dev"',
                  'ip link set "$dev" up']
        lines += [f'ip route add {other}.0/24 via {subnet}.2' for other in SUBNETS.values() if other != subnet]
    hosts = ['127.0.0.1 localhost'] + [f'{address(other, name)} {other}' for other in HOST_NAMES]
    lines.append(f"printf '%s\\n' {' '.join(map(shlex.quote, hosts))} > /etc/hosts")
    return '\n'.join(lines)


def create_pool(host):
    if host.name == 'backup':
        host.run('zpool destroy -f tank 2>/dev/null; zpool create -f -O mountpoint=none tank /dev/vdb'
                 ' && (umask 077; openssl rand -out /etc/zfs/tank.key 32)'
                 ' && zfs create -o encryption=aes-256-gcm -o keyformat=raw'
                 ' -o keylocation=file:///etc/zfs/tank.key tank/enc')
    else:
        host.run('zpool destroy -f rpool 2>/dev/null; zpool create -f rpool /dev/vdb && zfs create rpool/data')


def tool_tarball(repo_root):
    import proxmoxer
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w') as tar:
        tool = repo_root / 'planb_pvesync.py'
        if tool.exists():
            tar.add(tool, 'planb_pvesync.py')
        tar.add(Path(proxmoxer.__file__).parent, 'proxmoxer',
                filter=lambda info: None if '__pycache__' in info.name else info)
    return buf.getvalue()


def main():
    parser = argparse.ArgumentParser(description='Boot (up) or stop (down) the planb-pvesync VM lab.')
    parser.add_argument('action', choices=['up', 'down'])
    parser.add_argument('--state-dir', type=Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args()
    lab = Lab(args.state_dir, keep_running=True)
    if args.action == 'down':
        lab.stop()
        return
    if lab.running():
        sys.exit(f'a lab already runs in {args.state_dir}; stop it first: {sys.argv[0]} down')
    try:
        lab.start()
        lab.install_tool(LAB_DIR.parent.parent)
    except BaseException:
        lab.stop()
        raise
    print(lab.login_help())


if __name__ == '__main__':
    main()
