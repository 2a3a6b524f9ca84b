{{/* The labels every object carries: app.kubernetes.io/* for one component. */}}
{{- define "ambit.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: ambit
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* What a component's pods are selected by (never changes across upgrades). */}}
{{- define "ambit.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "ambit.image" -}}
{{ .root.Values.image.registry }}/{{ .component }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{/* The control plane's address, for ztunnel, the node agent and waypoints. */}}
{{- define "ambit.controlAddress" -}}
ambit-control.{{ .Release.Namespace }}.svc:15012
{{- end -}}

{{/* The identity the control plane's certificate must carry. */}}
{{- define "ambit.controlIdentity" -}}
spiffe://{{ .Values.trustDomain }}/ns/{{ .Release.Namespace }}/sa/ambit-control
{{- end -}}
