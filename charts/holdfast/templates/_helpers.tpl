{{/*
Shared names, labels and snippets of the holdfast chart.
The driver name is fixed: the binaries report it, and every PersistentVolume records it.
*/}}
{{- define "holdfast.driverName" -}}
holdfast.csi.dev
{{- end }}

{{- define "holdfast.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "holdfast.controllerName" -}}
{{ include "holdfast.fullname" . }}-controller
{{- end }}

{{- define "holdfast.nodeName" -}}
{{ include "holdfast.fullname" . }}-node
{{- end }}

{{/* Labels on every object. */}}
{{- define "holdfast.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: holdfast
{{- end }}

{{/* Selector labels of one component: pass (dict "root" $ "component" "node"). */}}
{{- define "holdfast.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "holdfast.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* "repository:tag" of a sidecar: pass the sidecar's values. */}}
{{- define "holdfast.sidecarImage" -}}
{{ .repository }}:{{ .tag }}
{{- end }}

{{- define "holdfast.leaseNamespace" -}}
{{ .Values.leaseStore.namespace | default .Release.Namespace }}
{{- end }}

{{- define "holdfast.logArgs" -}}
- --log-format={{ .Values.logFormat }}
- --log-level={{ .Values.logLevel }}
{{- end }}

{{/*
Lease store and timing, one block given verbatim to controller and node plugin: both
must agree on when a session counts as expired. Passed as the environment variables
that back the binaries' --lease-* flags, so a binary that does not use a setting
ignores it instead of refusing to start.
*/}}
{{- define "holdfast.leaseEnv" -}}
- name: HOLDFAST_LEASE_STORE
  value: {{ .Values.leaseStore.type | quote }}
{{- if eq .Values.leaseStore.type "kubernetes" }}
- name: HOLDFAST_LEASE_NAMESPACE
  value: {{ include "holdfast.leaseNamespace" . | quote }}
{{- else if eq .Values.leaseStore.type "etcd" }}
{{- if not .Values.leaseStore.etcd.endpoints }}
{{- fail "leaseStore.etcd.endpoints must list at least one etcd URL when leaseStore.type is etcd" }}
{{- end }}
- name: HOLDFAST_ETCD_ENDPOINTS
  value: {{ join "," .Values.leaseStore.etcd.endpoints | quote }}
{{- else }}
{{- fail (printf "leaseStore.type must be kubernetes or etcd, not %q" .Values.leaseStore.type) }}
{{- end }}
- name: HOLDFAST_LEASE_DURATION
  value: {{ .Values.lease.duration | quote }}
- name: HOLDFAST_LEASE_MARGIN
  value: {{ .Values.lease.margin | quote }}
- name: HOLDFAST_LEASE_EPSILON
  value: {{ .Values.lease.epsilon | quote }}
{{- end }}

{{/* The backend root volume, mounted at the same path by controller and node plugin. */}}
{{- define "holdfast.backendVolume" -}}
- name: backend
{{- if eq .Values.backend.type "hostPath" }}
  hostPath:
    path: {{ .Values.backend.hostPath.path }}
    type: DirectoryOrCreate
{{- else if eq .Values.backend.type "nfs" }}
{{- if not .Values.backend.nfs.server }}
{{- fail "backend.nfs.server is required when backend.type is nfs" }}
{{- end }}
  nfs:
    server: {{ .Values.backend.nfs.server }}
    path: {{ .Values.backend.nfs.path }}
{{- else if eq .Values.backend.type "pvc" }}
{{- if not .Values.backend.pvc.claimName }}
{{- fail "backend.pvc.claimName is required when backend.type is pvc" }}
{{- end }}
  persistentVolumeClaim:
    claimName: {{ .Values.backend.pvc.claimName }}
{{- else }}
{{- fail (printf "backend.type must be hostPath, nfs or pvc, not %q" .Values.backend.type) }}
{{- end }}
{{- end }}

{{/* Arguments every controller-side sidecar shares. */}}
{{- define "holdfast.controllerSidecarArgs" -}}
- --csi-address=/csi/csi.sock
- --v={{ .Values.sidecars.logVerbosity }}
- --timeout={{ .Values.sidecars.timeout }}
- --leader-election
- --leader-election-namespace=$(POD_NAMESPACE)
{{- end }}
