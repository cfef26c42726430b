{{/*
The `system.authz` policy (Rego v1) OPA decides every API request with, less its last line: the init
container appends `token := <the management token>`. input.path is the request's path as a list of
segments (without the query), input.identity the bearer token.
*/}}
{{- define "kopa.authzPolicy" -}}
package system.authz

# Written by the kopa chart. OPA runs with --authentication=token --authorization=basic: a request is
# served only if `allow` is true.

default allow := false

# The admission webhook's decision: the API server POSTs AdmissionReviews here, without a token.
allow if {
	input.method == "POST"
	input.path == {{ include "kopa.decisionPathSegments" . }}
}

# Health checks: /health, and /health/live and /health/ready (OPA's custom health checks).
allow if {
	input.method == "GET"
	input.path[0] == "health"
}
{{- if .Values.prometheus.enabled }}

# Prometheus scrapes /metrics without a token.
allow if {
	input.method == "GET"
	input.path == ["metrics"]
}
{{- end }}

# kopa, and anyone else holding the management token, may do everything.
allow if input.identity == token
{{ end }}
