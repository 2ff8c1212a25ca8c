{{/*
Names. Kubernetes names are cut to 63 characters; suffixes are added to a base cut
short enough that the suffixed name still fits.
*/}}
{{- define "oss-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oss-serving.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "oss-serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: never user-editable, so upgrades keep matching. */}}
{{- define "oss-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "oss-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "oss-serving.labels" -}}
helm.sh/chart: {{ include "oss-serving.chart" . }}
{{ include "oss-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: oss-serving
{{- end }}

{{- define "oss-serving.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Object names. */}}
{{- define "oss-serving.configName" -}}{{ include "oss-serving.fullname" . }}-config{{- end }}
{{- define "oss-serving.gatewayServiceName" -}}{{ include "oss-serving.fullname" . }}-gateway{{- end }}
{{- define "oss-serving.redisName" -}}{{ include "oss-serving.fullname" . }}-redis{{- end }}
{{- define "oss-serving.weightsClaimName" -}}
{{- .Values.weights.cache.existingClaim | default (printf "%s-weights" (include "oss-serving.fullname" .)) }}
{{- end }}

{{- define "oss-serving.apiKeysSecretName" -}}
{{- .Values.secrets.apiKeys.existingSecret | default (printf "%s-api-keys" (include "oss-serving.fullname" .)) }}
{{- end }}
{{- define "oss-serving.redisSecretName" -}}
{{- if eq .Values.redis.mode "external" }}
{{- .Values.redis.external.existingSecret }}
{{- else }}
{{- .Values.secrets.redis.existingSecret | default (printf "%s-redis" (include "oss-serving.fullname" .)) }}
{{- end }}
{{- end }}
{{- define "oss-serving.redisSecretKey" -}}
{{- if eq .Values.redis.mode "external" }}{{ .Values.redis.external.passwordKey }}{{ else }}{{ .Values.secrets.redis.key }}{{ end }}
{{- end }}
{{- define "oss-serving.hfSecretName" -}}
{{- if .Values.secrets.huggingface.existingSecret }}{{ .Values.secrets.huggingface.existingSecret }}
{{- else if .Values.secrets.huggingface.token }}{{ include "oss-serving.fullname" . }}-hf-token
{{- end }}
{{- end }}
{{- define "oss-serving.upstreamSecretName" -}}
{{- if .Values.secrets.upstream.existingSecret }}{{ .Values.secrets.upstream.existingSecret }}
{{- else if .Values.secrets.upstream.apiKey }}{{ include "oss-serving.fullname" . }}-upstream
{{- end }}
{{- end }}

{{/* The Redis URL the gateway uses (no password: that comes from a Secret). */}}
{{- define "oss-serving.redisUrl" -}}
{{- if eq .Values.redis.mode "external" }}
{{- required "redis.external.url is required when redis.mode is external" .Values.redis.external.url }}
{{- else }}
{{- printf "redis://%s:6379/0" (include "oss-serving.redisName" .) }}
{{- end }}
{{- end }}

{{/* Folder of a model in the weight cache: the hub id with "/" as "--". */}}
{{- define "oss-serving.modelDir" -}}
{{- printf "%s/%s" $.mountPath (.source | replace "/" "--") }}
{{- end }}

{{/* True (non-empty) when a model source is a Hugging Face hub id the cache fills. */}}
{{- define "oss-serving.isHubSource" -}}
{{- if and (not (hasPrefix "builtin:" .)) (not (hasPrefix "/" .)) (not (hasPrefix "." .)) (regexMatch "^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$" .) }}true{{- end }}
{{- end }}

{{/* Models whose weights the cache holds: list of {name, source, dir}. */}}
{{- define "oss-serving.cachedModels" -}}
{{- $out := list }}
{{- if .Values.weights.cache.enabled }}
{{- range .Values.config.models }}
{{- if include "oss-serving.isHubSource" .source }}
{{- $dir := include "oss-serving.modelDir" (dict "mountPath" $.Values.weights.cache.mountPath "source" .source) }}
{{- $out = append $out (dict "name" .name "source" .source "dir" $dir) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
The oss-serving configuration as rendered into the ConfigMap: the user's `config`
with the chart's own settings (bind address, port, Redis URL, weight-cache paths).
*/}}
{{- define "oss-serving.servingConfig" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $gateway := deepCopy (default dict $cfg.gateway) }}
{{- $_ := set $gateway "host" "0.0.0.0" }}
{{- $_ := set $gateway "port" (int .Values.service.port) }}
{{- $_ := set $cfg "gateway" $gateway }}
{{- $redis := deepCopy (default dict $cfg.redis) }}
{{- $_ := set $redis "url" (include "oss-serving.redisUrl" .) }}
{{- $_ := set $cfg "redis" $redis }}
{{- $metrics := deepCopy (default dict $cfg.metrics) }}
{{- /* Each gateway replica exports its own series through Ray's metrics agent. */}}
{{- $_ := set $metrics "ray_export" true }}
{{- $_ := set $cfg "metrics" $metrics }}
{{- $models := list }}
{{- range $cfg.models }}
{{- $m := deepCopy . }}
{{- if and $.Values.weights.cache.enabled (include "oss-serving.isHubSource" $m.source) }}
{{- $_ := set $m "source" (include "oss-serving.modelDir" (dict "mountPath" $.Values.weights.cache.mountPath "source" $m.source)) }}
{{- end }}
{{- $models = append $models $m }}
{{- end }}
{{- $_ := set $cfg "models" $models }}
{{- toYaml $cfg }}
{{- end }}

{{/*
The Ray Serve config (serveConfigV2): one application, built from our configuration,
which is inline (args.config): KubeRay hands a changed serveConfigV2 to the running
cluster, and Serve updates the application in place.
*/}}
{{- define "oss-serving.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.service.port }}
  {{- if .Values.ray.serve.requestTimeoutSeconds }}
  request_timeout_s: {{ .Values.ray.serve.requestTimeoutSeconds }}
  {{- end }}
logging_config:
  encoding: JSON
  log_level: {{ .Values.ray.serve.logLevel }}
applications:
  - name: oss-serving
    route_prefix: /
    import_path: serving.serve_app:build_app
    args:
      config:
        {{- include "oss-serving.servingConfig" . | nindent 8 }}
{{- end }}

{{/* host:port of the Redis the GCS keeps its state in (the release's Redis). */}}
{{- define "oss-serving.gcsRedisAddress" -}}
{{- if eq .Values.redis.mode "external" }}
{{- regexReplaceAll "/[0-9]+$" .Values.redis.external.url "" }}
{{- else }}
{{- printf "%s:6379" (include "oss-serving.redisName" .) }}
{{- end }}
{{- end }}

{{/* Container security context shared by every container of the chart. */}}
{{- define "oss-serving.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
runAsNonRoot: true
runAsUser: {{ .root.Values.securityContext.runAsUser }}
runAsGroup: {{ .root.Values.securityContext.runAsGroup }}
readOnlyRootFilesystem: {{ .readOnly }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container security context of a worker group: the chart's, with the group's
securityContext merged over it (capabilities stay dropped first). Kubernetes gives a
non-root process no ambient capabilities (kubernetes/kubernetes#56374): a capability
added to a container of a non-root user is in its bounding set only and never takes
effect. So adding one needs the group to run as root (runAsUser 0, runAsNonRoot false);
the render fails otherwise, and root without an added capability is refused too.
*/}}
{{- define "oss-serving.workerSecurityContext" -}}
{{- $group := .group }}
{{- $sc := include "oss-serving.containerSecurityContext" (dict "root" .root "readOnly" .root.Values.ray.readOnlyRootFilesystem) | fromYaml }}
{{- $merged := mergeOverwrite $sc (deepCopy (default dict $group.securityContext)) }}
{{- $added := default list $merged.capabilities.add }}
{{- $root := eq (int $merged.runAsUser) 0 }}
{{- if and $added (not $root) }}
{{- fail (printf "ray.workerGroups[%s].securityContext adds capabilities %v to a container running as uid %v: Kubernetes grants no ambient capabilities to non-root processes (kubernetes/kubernetes#56374), so they would never take effect; set runAsUser: 0 and runAsNonRoot: false in the same securityContext, or remove capabilities.add" $group.name $added $merged.runAsUser) }}
{{- end }}
{{- if and $root $merged.runAsNonRoot }}
{{- fail (printf "ray.workerGroups[%s].securityContext sets runAsUser 0 but not runAsNonRoot: false: the kubelet would refuse to start the container" $group.name) }}
{{- end }}
{{- if and $root (not $added) }}
{{- fail (printf "ray.workerGroups[%s].securityContext runs as root (runAsUser 0) without adding a capability: root is only for a capability the workload needs (capabilities.add, e.g. IPC_LOCK)" $group.name) }}
{{- end }}
{{- if and (not $root) (not $merged.runAsNonRoot) }}
{{- fail (printf "ray.workerGroups[%s].securityContext sets runAsNonRoot: false for a non-root user: leave it out" $group.name) }}
{{- end }}
{{- toYaml $merged }}
{{- end }}

{{- define "oss-serving.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Environment of a Ray container: configuration path and secrets (by reference).
Input: dict root, extraEnv (the worker group's, appended after ray.extraEnv).
*/}}
{{- define "oss-serving.rayEnv" -}}
{{- $extra := .extraEnv }}
{{- $root := .root }}
{{- with .root }}
- name: OSS_SERVING_CONFIG
  value: /etc/oss-serving/config/config.yaml
- name: OSS_SERVING_TENANTS_FILE
  value: /etc/oss-serving/secrets/{{ .Values.secrets.apiKeys.key }}
# The operator key (reads /metrics and the detailed /health) and the secret the per-tenant
# prefix-cache salts derive from: entries of the API keys Secret (optional in an existing one).
- name: OSS_SERVING_OPERATOR_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "oss-serving.apiKeysSecretName" . }}
      key: admin-api-key
      optional: true
- name: OSS_SERVING_CACHE_SALT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "oss-serving.apiKeysSecretName" . }}
      key: cache-salt-secret
      optional: true
{{- $redisSecret := include "oss-serving.redisSecretName" . }}
{{- if $redisSecret }}
- name: OSS_SERVING_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $redisSecret }}
      key: {{ include "oss-serving.redisSecretKey" . }}
{{- end }}
{{- with include "oss-serving.hfSecretName" . }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.huggingface.key }}
{{- end }}
{{- with include "oss-serving.upstreamSecretName" . }}
- name: OSS_SERVING_UPSTREAM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.upstream.key }}
{{- end }}
{{- with .Values.secrets.s3.existingSecret }}
{{- $s3 := default dict (default dict $root.Values.config.files).s3 }}
# The Files API's S3 store: its keys, under the names config.files.s3 gives them.
- name: {{ $s3.access_key_env | default "AWS_ACCESS_KEY_ID" }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.s3.accessKeyIdKey }}
- name: {{ $s3.secret_key_env | default "AWS_SECRET_ACCESS_KEY" }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.secrets.s3.secretAccessKeyKey }}
{{- with $root.Values.secrets.s3.sessionTokenKey }}
- name: {{ $s3.session_token_env | default "AWS_SESSION_TOKEN" }}
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.secrets.s3.existingSecret }}
      key: {{ . }}
{{- end }}
{{- end }}
{{- if .Values.weights.cache.enabled }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
- name: XDG_CACHE_HOME
  value: /tmp/cache
{{- if .Values.ray.serve.highThroughput }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
{{- end }}
{{- with concat (default list .Values.ray.extraEnv) $extra }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}
