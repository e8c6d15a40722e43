import re

from setuptools import setup

with open('planb_pvesync.py', encoding='utf-8') as fp:
    version = re.search(r"^__version__ = '([^']+)'", fp.read(), re.M).group(1)
with open('README.rst', encoding='utf-8') as fp:
    long_description = fp.read()

setup(
    name='planb-pvesync',
    version=version,
    description='Back up the ZFS disks of Proxmox VE guests to a ZFS backup host',
    long_description=long_description,
    long_description_content_type='text/x-rst',
    license='GPL-3.0-or-later',
    py_modules=['planb_pvesync'],
    python_requires='>=3.9',
    install_requires=['proxmoxer>=2.0', 'requests'],
    entry_points={'console_scripts': ['planb-pvesync = planb_pvesync:main']},
    classifiers=[
        'Environment :: Console',
        'License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)',
        'Programming Language :: Python :: 3',
        'Topic :: System :: Archiving :: Backup',
    ],
)
