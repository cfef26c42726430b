"""Real servers on loopback for kopa's tests and demo: etcd + kube-apiserver (kube), OPA (opa).

Binaries come from scripts/build-servers.sh (binaries), certificates from a throwaway CA (certs), and every
server is a ManagedProcess (processes) that is stopped on any exit. No pytest here: the demo uses it too.
"""
