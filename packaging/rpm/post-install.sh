# caretaker's users and runtime folders, the D-Bus policy, and the units known to systemd. The
# units are enabled by the image build (packer/), not by installing the package.
systemd-sysusers caretaker.conf >/dev/null 2>&1 || :
systemd-tmpfiles --create caretaker.conf >/dev/null 2>&1 || :
systemctl reload dbus >/dev/null 2>&1 || :
systemctl daemon-reload >/dev/null 2>&1 || :
