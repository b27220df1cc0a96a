"""``kexecfs vm``: QEMU guests whose RAM lives in kexecfs, so that they survive a host
kernel update (standard library only; QEMU is driven over QMP by hand).

- ``lifecycle``  start, update (stop and save into the instance), resume, stop, list
- ``devstate``   the device-state record saved beside the guest RAM, its commit and checks
- ``qemu``       QEMU's command line around the user's options, its process, the migration
                 settings that leave guest RAM out (x-ignore-shared; cpr-reboot where offered)
- ``qmp``        the QEMU Machine Protocol client
- ``cli``        the ``kexecfs vm`` subcommands
"""
