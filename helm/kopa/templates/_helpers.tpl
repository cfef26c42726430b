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
{{- $names := list $name (printf "%s.%s" $name $ns) (printf "%s.%s.svc" $name $ns) (printf "%s.%s.svc.cluster.local" $name $ns) "localhost" }}
{{- if include "kopa.bundleMode" . }}
{{- $mgmt := include "kopa.mgmtFullname" . }}
{{- /* the OPAs download from kopa's Service over TLS with the same certificate */}}
{{- $names = concat $names (list $mgmt (printf "%s.%s" $mgmt $ns) (printf "%s.%s.svc" $mgmt $ns) (printf "%s.%s.svc.cluster.local" $mgmt $ns)) }}
{{- end }}
{{- $names | toJson }}
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

{{/* mode: bundle: kopa is a Deployment of its own serving a bundle to the OPA pods ("true" or ""). */}}
{{- define "kopa.bundleMode" -}}
{{- if eq .Values.mode "bundle" }}true{{ end }}
{{- end }}

{{/* kopa is a sidecar in the OPA pod: push mode with mgmt.enabled ("true" or ""). */}}
{{- define "kopa.sidecar" -}}
{{- if and .Values.mgmt.enabled (not (include "kopa.bundleMode" .)) }}true{{ end }}
{{- end }}

{{/* OPA runs with a configuration file: the opa value, or kopa's bundle service in bundle mode. */}}
{{- define "kopa.hasOpaConfig" -}}
{{- if or .Values.opa (include "kopa.bundleMode" .) }}true{{ end }}
{{- end }}

{{/* Bundle mode: the name of kopa's Deployment, Service and PDB, and the labels that select its pods (a
name of their own, so that OPA's selector, the chart's, never matches kopa's pods). */}}
{{- define "kopa.mgmtFullname" -}}
{{- printf "%s-mgmt" (include "kopa.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}

{{- define "kopa.mgmtSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-mgmt" (include "kopa.name" . | trunc 58 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Bundle mode: where OPA finds kopa's bundle token, and the paths kopa's bundle never claims. */}}
{{- define "kopa.bundleTokenDir" -}}
/bundle-token
{{- end }}

{{- define "kopa.reservedRoots" -}}
{{- prepend .Values.mgmt.bundle.reservedRoots "system" | uniq | join "," }}
{{- end }}

{{/*
OPA's configuration file. Push mode: the opa value as it is. Bundle mode: the opa value plus kopa as the
service `kopa` and its bundle `kopa` (long polling, the token read from the mounted Secret at each request,
kopa's CA with useHttps), and kopa as OPA's status service (`status: {service: kopa}`: each OPA reports
which revision it runs) unless opa.status is given (OPA reports to one service only).
*/}}
{{- define "kopa.opaConfig" -}}
{{- if include "kopa.bundleMode" . }}
{{- $config := deepCopy (.Values.opa | default dict) }}
{{- $service := dict "url" (printf "%s://%s.%s.svc:%d" (include "kopa.scheme" .) (include "kopa.mgmtFullname" .) .Release.Namespace (int .Values.mgmt.bundle.port)) "credentials" (dict "bearer" (dict "token_path" (printf "%s/token" (include "kopa.bundleTokenDir" .)))) }}
{{- if .Values.useHttps }}
{{- $_ := set $service "tls" (dict "ca_cert" "/certs/ca.crt") }}
{{- end }}
{{- $services := get $config "services" | default dict }}
{{- if not (kindIs "map" $services) }}
{{- fail "mode: bundle adds kopa to opa.services: write opa.services as a map (name -> service), not a list" }}
{{- end }}
{{- $_ := set $services "kopa" $service }}
{{- $_ := set $config "services" $services }}
{{- $bundles := get $config "bundles" | default dict }}
{{- $polling := dict "min_delay_seconds" 2 "max_delay_seconds" 10 "long_polling_timeout_seconds" (int .Values.mgmt.bundle.longPollingTimeoutSeconds) }}
{{- $_ := set $bundles "kopa" (dict "service" "kopa" "resource" "bundles/kopa" "polling" $polling) }}
{{- $_ := set $config "bundles" $bundles }}
{{- if not (hasKey $config "status") }}
{{- $_ := set $config "status" (dict "service" "kopa") }}
{{- end }}
{{- toYaml $config }}
{{- else }}
{{- toYaml .Values.opa }}
{{- end }}
{{- end }}

{{/*
Bundle mode: the bearer token the OPAs send to kopa, decided once per render (cached on the root context)
and kept across upgrades: an existing Secret of this release is read back (`lookup`), as the certificate is.
*/}}
{{- define "kopa.bundleToken" -}}
{{- if not (hasKey $ "kopaBundleToken") }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-bundle-token" (include "kopa.fullname" .)) }}
{{- if and $existing $existing.data (hasKey $existing.data "token") }}
{{- $_ := set $ "kopaBundleToken" (index $existing.data "token" | b64dec) }}
{{- else }}
{{- $_ := set $ "kopaBundleToken" (randAlphaNum 40) }}
{{- end }}
{{- end }}
{{- get $ "kopaBundleToken" }}
{{- end }}

{{/* kopa's flags for what it watches and loads, its probe server and logs, then mgmt.extraArgs; the same
for the sidecar and for the bundle-mode Deployment, which add their own before. */}}
{{- define "kopa.sourceArgs" -}}
- --namespaces={{ include "kopa.namespaces" . }}
- --enable-policies={{ .Values.mgmt.policies.enabled }}
- --policy-label={{ .Values.mgmt.policies.label }}
- --policy-value={{ .Values.mgmt.policies.value }}
- --enable-data={{ .Values.mgmt.data.enabled }}
- --data-label={{ .Values.mgmt.data.label }}
- --data-value={{ .Values.mgmt.data.value }}
- --replicate-path={{ .Values.mgmt.replicate.path }}
{{- range .Values.mgmt.replicate.namespace }}
- --replicate={{ . }}
{{- end }}
{{- range .Values.mgmt.replicate.cluster }}
- --replicate-cluster={{ . }}
{{- end }}
{{- with .Values.mgmt.replicate.ignoreNs }}
- --replicate-ignore-namespaces={{ join "," . }}
{{- end }}
{{- if .Values.mgmt.replicate.keepManagedFields }}
- --replicate-keep-managed-fields
{{- end }}
{{- range $resource, $selector := .Values.mgmt.replicate.selectors }}
- {{ printf "--replicate-selector=%s=%s" $resource $selector | quote }}
{{- end }}
{{- range $resource, $fields := .Values.mgmt.replicate.fields }}
- {{ printf "--replicate-fields=%s=%s" $resource (join "," $fields) | quote }}
{{- end }}
{{- if .Values.mgmt.replicate.auto }}
# Auto-replication: kopa reads OPA's own configuration file (the same Secret, mounted read-only
# below) for the bundles whose policies it analyses.
- --opa-config={{ include "kopa.opaConfigFile" . }}
{{- end }}
- --health-endpoint=0.0.0.0:{{ .Values.mgmt.healthPort }}
- --log-level={{ .Values.mgmt.logLevel }}
- --log-format={{ .Values.mgmt.logFormat }}
{{- range .Values.mgmt.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The projected volume of kopa's API credentials (the sidecar's and the bundle-mode Deployment's). */}}
{{- define "kopa.kubeApiAccessVolume" -}}
# kopa's API credentials, as the kubelet projects them for an automounted token: a token that
# expires and that the kubelet rotates (kopa reloads it after a 401), the cluster's CA, the namespace.
- name: kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: {{ .Values.mgmt.serviceAccountTokenExpirationSeconds }}
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end }}

{{/* OPA's readiness: with the sidecar, kopa's marker (kopa-health.rego); in bundle mode, kopa's bundle
activated; without kopa, OPA's plugins. */}}
{{- define "kopa.opaReadyPath" -}}
{{- if include "kopa.bundleMode" . }}/health?bundles
{{- else }}{{ .Values.mgmt.enabled | ternary "/health/ready" "/health?plugins" }}
{{- end }}
{{- end }}
