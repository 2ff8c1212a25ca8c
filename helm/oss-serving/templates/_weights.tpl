{{/*
The weight cache. weights.cache.type chooses where each model's folder
(/models/<org>--<name>) lives:
  volume: a ReadWriteOnce generic ephemeral volume per worker pod (any block-storage
          class binds it), filled by the pod's fetch-weights init container;
  node:   an emptyDir on the node's disk, requested as ephemeral-storage, filled the same way;
  shared: one PVC (ReadWriteMany, or existingClaim) filled once by the download Job
          (weights.yaml), or staged by hand when weights.download.enabled is false;
  host:   a folder staged by hand on every GPU node's own disk (weights.cache.hostPath,
          e.g. local NVMe), mounted read-only; never downloaded (download.enabled false).
Every download fetches only the files vLLM loads (serving/cluster/weights.py:
ALLOW_PATTERNS minus original/ and metal/).
*/}}

{{/* Whole GiB of a quantity written in Gi or Ti. */}}
{{- define "oss-serving.sizeGi" -}}
{{- if hasSuffix "Ti" . }}{{ mul (trimSuffix "Ti" . | int) 1024 }}{{ else }}{{ trimSuffix "Gi" . | int }}{{ end }}
{{- end }}

{{/* /tmp of the Ray pods; without a cache the engines download into it. */}}
{{- define "oss-serving.tmpSize" -}}
{{- if .Values.weights.cache.enabled }}20Gi{{ else }}{{ add 20 (include "oss-serving.sizeGi" .Values.weights.cache.size) }}Gi{{ end }}
{{- end }}

{{/* Fails the render when the cached models' weights (the budget table's size plus 5 %) exceed weights.cache.size. */}}
{{- define "oss-serving.weightsFit" -}}
{{- $cached := include "oss-serving.cachedModels" . | fromJsonArray }}
{{- $table := .Files.Get "files/budget.json" | fromJson }}
{{- $needMiB := 0 }}
{{- $names := list }}
{{- range $m := $cached }}
{{- $key := include "oss-serving.budgetModelKey" (dict "table" $table "model" $m) }}
{{- if $key }}
{{- $needMiB = add $needMiB (index $table.models $key).weightsMiB }}
{{- $names = append $names $m.name }}
{{- end }}
{{- end }}
{{- $needGi := add (div (mul $needMiB 105) (mul 100 1024)) 1 }}
{{- $haveGi := include "oss-serving.sizeGi" .Values.weights.cache.size | int }}
{{- if and .Values.weights.cache.enabled (ne .Values.weights.cache.type "host") (gt $needGi $haveGi) }}
{{- fail (printf "weights.cache.size %s is too small: the weights of %s need about %dGi (the files vLLM loads, plus 5%%); set weights.cache.size to %dGi or more" .Values.weights.cache.size (join ", " $names) $needGi $needGi) }}
{{- end }}
{{- if and (not .Values.weights.download.enabled) (ne .Values.weights.cache.type "shared") (ne .Values.weights.cache.type "host") }}
{{- fail (printf "weights.download.enabled false needs weights.cache.type shared (an existingClaim with the weights staged) or host (a folder staged on every GPU node, weights.cache.hostPath): a %s cache starts empty in every pod" .Values.weights.cache.type) }}
{{- end }}
{{- if and .Values.weights.cache.enabled (eq .Values.weights.cache.type "host") }}
{{- if not .Values.weights.cache.hostPath }}
{{- fail "weights.cache.type host needs weights.cache.hostPath: the folder on every GPU node (e.g. /mnt/nvme/models) that holds one folder per model" }}
{{- end }}
{{- if .Values.weights.download.enabled }}
{{- fail "weights.cache.type host holds weights you staged on every GPU node, read-only: set weights.download.enabled false (or use weights.cache.type node to download onto the node's disk)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment of every download: Hugging Face state in /tmp, Xet's chunk cache off (it would fill /tmp). */}}
{{- define "oss-serving.downloadEnv" -}}
- name: HF_HOME
  value: /tmp/hf-home
- name: HF_XET_CACHE
  value: /tmp/hf-home/xet
- name: HF_XET_CHUNK_CACHE_SIZE_BYTES
  value: "0"
- name: HF_HUB_DISABLE_TELEMETRY
  value: "1"
{{- if include "oss-serving.hfSecretName" . }}
# huggingface_hub reads the token from this file (the Secret, mounted).
- name: HF_TOKEN_PATH
  value: /run/secrets/huggingface/token
{{- end }}
{{- end }}

{{/* The download command: python -m serving.cluster.weights download REPO=DIR ... */}}
{{- define "oss-serving.downloadCommand" -}}
- python
- -m
- serving.cluster.weights
- download
{{- range .cached }}
- {{ printf "%s=%s" .source .dir | quote }}
{{- end }}
{{- end }}

{{/* True (non-empty) when each worker pod downloads into its own cache (volume, node). */}}
{{- define "oss-serving.podFetchesWeights" -}}
{{- if and (ne .Values.weights.cache.type "shared") (ne .Values.weights.cache.type "host") }}true{{ end }}
{{- end }}

{{/* The init container of a worker pod: fetch (volume, node), wait for the Job (shared), or check staged weights (shared, host). */}}
{{- define "oss-serving.weightsInitContainer" -}}
{{- $root := .root }}
{{- $w := $root.Values.weights }}
{{- $fetch := include "oss-serving.podFetchesWeights" $root }}
{{- if $fetch }}
# Fills this pod's own weight volume with the files vLLM loads (skipped when complete).
- name: fetch-weights
{{- else if and $w.download.enabled (eq $w.cache.type "shared") }}
# Waits until the download Job has filled the shared cache for every model.
- name: wait-for-weights
{{- else }}
# The weights were staged by hand: fail at once, naming what is missing, if they are not there.
- name: check-weights
{{- end }}
  image: {{ include "oss-serving.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  {{- if $fetch }}
  command:
    {{- include "oss-serving.downloadCommand" . | nindent 4 }}
  env:
    {{- include "oss-serving.downloadEnv" $root | nindent 4 }}
  resources:
    {{- toYaml $w.download.resources | nindent 4 }}
  {{- else }}
  command:
    - python
    - -m
    - serving.cluster.weights
    - {{ if and $w.download.enabled (eq $w.cache.type "shared") }}wait{{ else }}check{{ end }}
    {{- range .cached }}
    - {{ .dir | quote }}
    {{- end }}
  resources:
    requests: {cpu: 10m, memory: 64Mi}
    limits: {cpu: 200m, memory: 256Mi}
  {{- end }}
  securityContext:
    {{- include "oss-serving.containerSecurityContext" (dict "root" $root "readOnly" true) | nindent 4 }}
  volumeMounts:
    - name: weights
      mountPath: {{ $w.cache.mountPath }}
      readOnly: {{ not $fetch }}
    {{- if $fetch }}
    - name: tmp
      mountPath: /tmp
    {{- if include "oss-serving.hfSecretName" $root }}
    - name: hf-token
      mountPath: /run/secrets/huggingface
      readOnly: true
    {{- end }}
    {{- end }}
{{- end }}

{{/* The weights volume of a worker pod (and its token volume when it downloads). */}}
{{- define "oss-serving.weightsVolume" -}}
{{- $w := .Values.weights }}
- name: weights
{{- if eq $w.cache.type "volume" }}
  # One ReadWriteOnce volume per pod, created with the pod and deleted with it.
  ephemeral:
    volumeClaimTemplate:
      metadata:
        labels:
          {{- include "oss-serving.selectorLabels" . | nindent 10 }}
          app.kubernetes.io/component: weights
      spec:
        accessModes: [ReadWriteOnce]
        {{- with $w.cache.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ $w.cache.size }}
{{- else if eq $w.cache.type "node" }}
  emptyDir:
    sizeLimit: {{ $w.cache.size }}
{{- else if eq $w.cache.type "host" }}
  # Staged by hand on every GPU node (one folder per model); Directory: the pod does not
  # start on a node without it.
  hostPath:
    path: {{ $w.cache.hostPath }}
    type: Directory
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "oss-serving.weightsClaimName" . }}
    readOnly: true
{{- end }}
{{- if and (include "oss-serving.podFetchesWeights" .) (include "oss-serving.hfSecretName" .) }}
- name: hf-token
  secret:
    secretName: {{ include "oss-serving.hfSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.secrets.huggingface.key }}
        path: token
{{- end }}
{{- end }}

{{/* Requests and limits of a worker container: the group's, its GPUs, extra resources (RDMA), node-disk weights. */}}
{{- define "oss-serving.workerResources" -}}
{{- $group := .group }}
{{- $w := .root.Values.weights }}
{{- $extra := deepCopy (default dict $group.extraResources) }}
{{- $_ := set $extra "nvidia.com/gpu" ($group.gpusPerPod | toString) }}
{{- if and $w.cache.enabled (eq $w.cache.type "node") }}
{{- $disk := printf "%dGi" (add 20 (include "oss-serving.sizeGi" $w.cache.size)) }}
{{- $_ := set $extra "ephemeral-storage" $disk }}
{{- end }}
requests:
  {{- toYaml (merge (deepCopy $extra) (deepCopy $group.resources.requests)) | nindent 2 }}
limits:
  {{- toYaml (merge (deepCopy $extra) (deepCopy $group.resources.limits)) | nindent 2 }}
{{- end }}
