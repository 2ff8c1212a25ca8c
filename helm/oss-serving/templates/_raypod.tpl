{{/* Pod-level settings shared by the head and worker pods. */}}
{{- define "oss-serving.rayPodSpec" -}}
{{- $root := .root -}}
securityContext:
  {{- include "oss-serving.podSecurityContext" $root | nindent 2 }}
{{- if .automountToken }}
# KubeRay's autoscaler sidecar in the head pod calls the Kubernetes API.
automountServiceAccountToken: true
{{- else }}
automountServiceAccountToken: false
{{- end }}
terminationGracePeriodSeconds: 120
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.ray.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $root.Values.ray.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Mounts of a Ray container. The configuration is a directory mount of the -config
ConfigMap (no subPath: the kubelet keeps it current), for `oss-serve` inside the pod;
the Serve application itself gets its configuration inline (serveConfigV2).
*/}}
{{- define "oss-serving.rayVolumeMounts" -}}
- name: config
  mountPath: /etc/oss-serving/config
  readOnly: true
- name: api-keys
  mountPath: /etc/oss-serving/secrets
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- if .weights }}
- name: weights
  mountPath: {{ .root.Values.weights.cache.mountPath }}
  readOnly: true
{{- end }}
{{- with concat (default list .root.Values.ray.extraVolumeMounts) .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "oss-serving.rayVolumes" -}}
- name: config
  configMap:
    name: {{ include "oss-serving.configName" .root }}
- name: api-keys
  secret:
    secretName: {{ include "oss-serving.apiKeysSecretName" .root }}
    defaultMode: 0440
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: tmp
  emptyDir:
    sizeLimit: {{ include "oss-serving.tmpSize" .root }}
{{- with concat (default list .root.Values.ray.extraVolumes) .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}
