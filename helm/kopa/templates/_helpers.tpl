{{/*
Names, labels and the pieces several templates share.
*/}}

{{- define "kopa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kopa.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Cluster-scoped objects (ClusterRoles, webhooks) carry the release's namespace: two releases of the same
name in different namespaces must not share them. */}}
{{- define "kopa.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "kopa.fullname" .) }}
{{- end }}

{{- define "kopa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kopa.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kopa.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kopa.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kopa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kopa.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* kopa's image: required, and not kube-mgmt's (which would get kopa's flags and probes). */}}
{{- define "kopa.mgmtImage" -}}
{{- $repository := .Values.mgmt.image.repository }}
{{- if not $repository }}
{{- fail "mgmt.image.repository is required: kopa's image is not published. Build it from kopa's Dockerfile (docker build --build-arg COMMIT=$(git rev-parse --short HEAD) --build-arg VERSION=0.1.0 -t <registry>/kopa:0.1.0 .), push it, and install with --set mgmt.image.repository=<registry>/kopa --set mgmt.image.tag=0.1.0 (helm/kopa/README.md, Install)" }}
{{- end }}
{{- if regexMatch "(^|/)openpolicyagent/kube-mgmt$" $repository }}
{{- fail (printf "mgmt.image.repository is %s, kube-mgmt's image: it does not take kopa's flags or serve kopa's probes. Set mgmt.image.repository (and mgmt.image.tag) to the kopa image you built and pushed (helm/kopa/README.md, Install)" $repository) }}
{{- end }}
{{- printf "%s:%s" .Values.mgmt.image.repository (.Values.mgmt.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The namespaces kopa watches: mgmt.namespaces, or the release's namespace. */}}
{{- define "kopa.namespaces" -}}
{{- if .Values.mgmt.namespaces }}
{{- join "," .Values.mgmt.namespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "kopa.allNamespaces" -}}
{{- if has "*" .Values.mgmt.namespaces }}true{{ end }}
{{- end }}

{{/* The Secret OPA's certificate is in: tls.existingSecret, or the chart's (or cert-manager's) own. */}}
{{- define "kopa.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-cert" (include "kopa.fullname" .)) }}
{{- end }}

{{- define "kopa.rootCACertificate" -}}
{{- printf "%s-ca" (include "kopa.fullname" .) }}
{{- end }}

{{- define "kopa.selfSignedIssuer" -}}
{{- printf "%s-selfsigned" (include "kopa.fullname" .) }}
{{- end }}

{{- define "kopa.rootCAIssuer" -}}
{{- printf "%s-ca" (include "kopa.fullname" .) }}
{{- end }}

{{/* DNS names of OPA's Service, which the serving certificate must carry. */}}
{{- define "kopa.serviceDNSNames" -}}
{{- $name := include "kopa.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- list $name (printf "%s.%s" $name $ns) (printf "%s.%s.svc" $name $ns) (printf "%s.%s.svc.cluster.local" $name $ns) "localhost" | toJson }}
{{- end }}

{{/*
The TLS material, decided once per render and cached on the root context, so the Secret, the webhook's
caBundle and the pod's checksum all see the same certificate. Returns JSON {"ca": PEM, "cert": PEM,
"key": PEM}, or {} when the chart does not hold the certificate itself (cert-manager, or no HTTPS).

generateCerts: an existing Secret of this release (`lookup`) is reused as it is, so an upgrade keeps the
certificate and the webhook's caBundle, and does not restart the pods. A new CA and certificate are made
only when there is none (first install, or `helm template`, which cannot look anything up).

tls.existingSecret: the chart neither makes nor reads the Secret (renders are the same every time, as
GitOps tools that run `helm template` need); the webhook's caBundle is the CA value.
*/}}
{{- define "kopa.tls" -}}
{{- if and .Values.tls.existingSecret .Values.certManager.enabled }}
{{- fail "tls.existingSecret and certManager.enabled both say where OPA's certificate comes from: choose one" }}
{{- end }}
{{- if not (hasKey $ "kopaTLS") }}
{{- $tls := dict }}
{{- if and .Values.useHttps (not .Values.certManager.enabled) }}
{{- if .Values.tls.existingSecret }}
{{- if and .Values.admissionController.enabled (not .Values.CA) }}
{{- fail "tls.existingSecret with admissionController.enabled needs CA: the PEM of the Secret's ca.crt, for the webhook's caBundle (the chart does not read the Secret, so renders stay the same)" }}
{{- end }}
{{- with .Values.CA }}
{{- $_ := set $tls "ca" . }}
{{- end }}
{{- else if .Values.generateCerts }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "kopa.tlsSecretName" .) }}
{{- if and $existing $existing.data (hasKey $existing.data "ca.crt") (hasKey $existing.data "tls.crt") (hasKey $existing.data "tls.key") }}
{{- $_ := set $tls "ca" (index $existing.data "ca.crt" | b64dec) }}
{{- $_ := set $tls "cert" (index $existing.data "tls.crt" | b64dec) }}
{{- $_ := set $tls "key" (index $existing.data "tls.key" | b64dec) }}
{{- else }}
{{- $ca := genCA (printf "%s CA" (include "kopa.fullname" .)) 3650 }}
{{- $dns := include "kopa.serviceDNSNames" . | fromJsonArray }}
{{- $cert := genSignedCert (printf "%s.%s.svc" (include "kopa.fullname" .) .Release.Namespace) (list "127.0.0.1") $dns 3650 $ca }}
{{- $_ := set $tls "ca" $ca.Cert }}
{{- $_ := set $tls "cert" $cert.Cert }}
{{- $_ := set $tls "key" $cert.Key }}
{{- end }}
{{- else }}
{{- if not (and .Values.CA .Values.cert .Values.key) }}
{{- fail "useHttps with generateCerts=false and certManager.enabled=false needs CA, cert and key (PEM)" }}
{{- end }}
{{- $_ := set $tls "ca" .Values.CA }}
{{- $_ := set $tls "cert" .Values.cert }}
{{- $_ := set $tls "key" .Values.key }}
{{- end }}
{{- end }}
{{- $_ := set $ "kopaTLS" $tls }}
{{- end }}
{{- get $ "kopaTLS" | toJson }}
{{- end }}

{{/* The webhook's path on OPA, as OPA's authorization input sees it: a list of path segments. */}}
{{- define "kopa.decisionPathSegments" -}}
{{- $path := .Values.admissionController.path | trimPrefix "/" }}
{{- splitList "/" $path | toJson }}
{{- end }}

{{/*
RBAC rules for replicated resources: [group/]version/resource -> {apiGroups: [group], resources: [resource]}.
Argument: a list of such strings. Returns a JSON list of rules, one per API group.
*/}}
{{- define "kopa.replicationRules" -}}
{{- $byGroup := dict }}
{{- range . }}
{{- $parts := splitList "/" . }}
{{- $group := "" }}
{{- $resource := last $parts }}
{{- if eq (len $parts) 3 }}{{ $group = first $parts }}{{ end }}
{{- $resources := get $byGroup $group | default list }}
{{- $_ := set $byGroup $group (append $resources $resource | uniq) }}
{{- end }}
{{- $rules := list }}
{{- range $group := keys $byGroup | sortAlpha }}
{{- $rules = append $rules (dict "apiGroups" (list $group) "resources" (get $byGroup $group | sortAlpha) "verbs" (list "get" "list" "watch")) }}
{{- end }}
{{- $rules | toJson }}
{{- end }}

{{/* Scheme of OPA's API. */}}
{{- define "kopa.scheme" -}}
{{- if .Values.useHttps }}https{{ else }}http{{ end }}
{{- end }}

{{/* Where OPA's configuration file (the Secret <fullname>-config, from the opa value) is mounted: OPA reads it
with --config-file, and with mgmt.replicate.auto kopa reads the same file with --opa-config. */}}
{{- define "kopa.opaConfigDir" -}}
/config
{{- end }}

{{- define "kopa.opaConfigFile" -}}
{{ include "kopa.opaConfigDir" . }}/config.yaml
{{- end }}

{{/*
The rules of mgmt.replicate.autoRead, with read verbs only. Refuses a wildcard: a "*" resource would grant
Secrets (and everything else) without naming them. Returns a JSON list of rules.
*/}}
{{- define "kopa.autoReadRules" -}}
{{- $rules := list }}
{{- range $i, $rule := .Values.mgmt.replicate.autoRead }}
{{- if or (has "*" $rule.apiGroups) (has "*" $rule.resources) }}
{{- fail (printf "mgmt.replicate.autoRead[%d] has a \"*\": name the API groups and resources auto mode may read (a wildcard would grant Secrets too); rbac.extraRules takes any rule if you really mean it" $i) }}
{{- end }}
{{- $rules = append $rules (dict "apiGroups" $rule.apiGroups "resources" $rule.resources "verbs" (list "get" "list" "watch")) }}
{{- end }}
{{- $rules | toJson }}
{{- end }}

{{/* One RBAC rule in words for NOTES: "services, endpoints (core group)", "ingresses (networking.k8s.io)". */}}
{{- define "kopa.ruleInWords" -}}
{{- $groups := list }}
{{- range .apiGroups }}{{ $groups = append $groups (eq . "" | ternary "core group" .) }}{{ end }}
{{- printf "%s (%s)" (join ", " .resources) (join ", " $groups) }}
{{- end }}
