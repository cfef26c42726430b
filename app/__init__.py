"""kopa: keeps an Open Policy Agent in sync with a Kubernetes cluster."""
