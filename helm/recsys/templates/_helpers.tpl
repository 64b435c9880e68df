{{- define "recsys.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "recsys.labels" -}}
app.kubernetes.io/part-of: recsys
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* Address of one of the services inside the cluster: name port */}}
{{- define "recsys.address" -}}
{{- printf "%s-%s:%v" (include "recsys.fullname" .root) .name .port -}}
{{- end -}}

{{/* gRPC probes: Kubernetes asks grpc.health.v1 directly. */}}
{{- define "recsys.probes" -}}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .port }}
  initialDelaySeconds: 10
  periodSeconds: 10
  failureThreshold: 3
{{- end -}}
