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

{{/* Probes. In plaintext Kubernetes asks grpc.health.v1 directly; its gRPC probe cannot
present a client certificate, so with mutual TLS the probe runs `recsysctl wait-ready`
in the container with the service's own certificate. Args: port, root. */}}
{{- define "recsys.probes" -}}
{{- $probe := dict "grpc" (dict "port" .port) -}}
{{- if .root.Values.tls.enabled -}}
{{- $probe = dict "exec" (dict "command" (list "/opt/recsys/bin/recsysctl" "--tls-ca" "/etc/recsys/tls/ca.crt" "--tls-cert" "/etc/recsys/tls/tls.crt" "--tls-key" "/etc/recsys/tls/tls.key" "wait-ready" "--timeout-s" "2" (printf "localhost:%v" .port))) -}}
{{- end }}
readinessProbe:
  {{- toYaml $probe | nindent 2 }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  {{- toYaml $probe | nindent 2 }}
  initialDelaySeconds: 10
  periodSeconds: 10
  failureThreshold: 3
{{- end -}}

{{/* The admin port (every service's admin RPCs, and nothing else) and the metrics port. */}}
{{- define "recsys.adminPort" -}}
- name: admin
  containerPort: {{ .Values.admin.port }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
{{- end -}}

{{/* Pods of one component spread over nodes, so one node's loss takes few of them. Args: root, name. */}}
{{- define "recsys.spread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        app.kubernetes.io/instance: {{ .root.Release.Name }}
        app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* Security sections of every service's TOML: the admin port and who may call it, and
mutual TLS from the mounted Secret (reloaded when the Secret changes). */}}
{{- define "recsys.securityConfig" -}}
[server.admin]
listen = "0.0.0.0:{{ .Values.admin.port }}"
allowed_operators = {{ .Values.admin.allowedOperators | toJson }}
{{- if .Values.admin.tokenSecret }}
token_file = "/etc/recsys/admin/tokens"
{{- end }}
{{- if .Values.tls.enabled }}
[server.tls]
enabled = true
ca_file = "/etc/recsys/tls/ca.crt"
cert_file = "/etc/recsys/tls/tls.crt"
key_file = "/etc/recsys/tls/tls.key"
{{- end }}
{{- end -}}

{{/* Mounts of the TLS and admin-token Secrets (whole directories, no subPath, so that a
rotated Secret reaches the running pod). Args: root. */}}
{{- define "recsys.securityMounts" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/recsys/tls
  readOnly: true
{{- end }}
{{- if .Values.admin.tokenSecret }}
- name: admin-tokens
  mountPath: /etc/recsys/admin
  readOnly: true
{{- end }}
{{- end -}}

{{/* The Secrets behind those mounts. Args: root, name (the service's short name). */}}
{{- define "recsys.securityVolumes" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "recsys.fullname" .root }}-{{ .name }}-tls
{{- end }}
{{- if .root.Values.admin.tokenSecret }}
- name: admin-tokens
  secret:
    secretName: {{ .root.Values.admin.tokenSecret }}
{{- end }}
{{- end -}}
