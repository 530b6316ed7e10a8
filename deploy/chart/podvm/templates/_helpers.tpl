{{/* The release's name is the VM's (or the pets' prefix); "podvm" renders the plain manifests in deploy/. */}}
{{- define "podvm.fullname" -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* The first VM's DNS name in the namespace, through the headless Service. */}}
{{- define "podvm.firstVm" -}}
{{- $name := include "podvm.fullname" . -}}
{{- ternary $name (printf "%s-0.%s" $name $name) (eq .Values.workload.kind "Pod") -}}
{{- end -}}

{{- define "podvm.selector" -}}
app.kubernetes.io/name: podvm
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "podvm.metadata" -}}
labels:
  {{- include "podvm.selector" . | nindent 2 }}
{{- end -}}

{{- define "podvm.image" -}}
{{- if .digest -}}{{ .repository }}@{{ .digest }}{{- else -}}{{ .repository }}:{{ .tag }}{{- end -}}
{{- end -}}

{{/* Refusals the schema cannot express: they name the values at fault. */}}
{{- define "podvm.check" -}}
{{- $v := .Values -}}
{{- if and $v.metrics.enabled (eq (int $v.metrics.port) 5900) $v.vnc.enabled -}}
{{- fail "metrics.port=5900: VNC has that port; choose another or set vnc.enabled=false" -}}
{{- end -}}
{{- if and $v.console.enabled $v.console.expose.enabled (has (int $v.console.expose.port) (list 5900 (int $v.metrics.port))) -}}
{{- fail (printf "console.expose.port=%d: VNC or the metrics hold that port in the pod; choose another" (int $v.console.expose.port)) -}}
{{- end -}}
{{- if and $v.console.enabled (has (int $v.console.port) (list 5900 (int $v.metrics.port))) -}}
{{- fail (printf "console.port=%d: VNC or the metrics hold that port; choose another (e.g. 6080)" (int $v.console.port)) -}}
{{- end -}}
{{- if and $v.console.expose.enabled (not $v.console.enabled) -}}
{{- fail "console.expose.enabled=true needs console.enabled=true" -}}
{{- end -}}
{{- $disks := list -}}
{{- range $v.dataDisks -}}
{{- if has .name $disks -}}
{{- fail (printf "dataDisks: two disks are named %q; each needs a name of its own" .name) -}}
{{- end -}}
{{- $disks = append $disks .name -}}
{{- end -}}
{{- if and $v.metrics.podMonitor.enabled (not $v.metrics.enabled) -}}
{{- fail "metrics.podMonitor.enabled=true needs metrics.enabled=true" -}}
{{- end -}}
{{- if eq (int $v.readiness.port) (int (ternary $v.metrics.port 0 $v.metrics.enabled)) -}}
{{- fail (printf "readiness.port=%d: the metrics hold that port in the pod; the probe must reach the guest" (int $v.readiness.port)) -}}
{{- end -}}
{{- if and $v.vnc.enabled (eq (int $v.readiness.port) 5900) -}}
{{- fail "readiness.port=5900: VNC holds that port in the pod; the probe must reach the guest" -}}
{{- end -}}
{{- end -}}

{{/* Settings both containers read the same way. */}}
{{- define "podvm.sharedEnv" -}}
{{- $v := .Values -}}
- {name: SHUTDOWN_TIMEOUT, value: {{ printf "%ds" (int $v.vm.shutdownTimeout) }}}
{{- if eq $v.vm.onStop "suspend" }}
# The runner saves the VM first, and shuts it down only when the save fails: the network stays for both.
- {name: ON_STOP, value: suspend}
- {name: SUSPEND_TIMEOUT, value: {{ printf "%ds" (int $v.vm.suspendTimeout) }}}
{{- end }}
{{- if $v.metrics.enabled }}
# TCP {{ $v.metrics.port }} stays in the pod for the metrics, like 5900 for VNC: the same port in both containers.
- {name: METRICS_PORT, value: {{ $v.metrics.port | quote }}}
{{- end }}
{{- if not $v.vnc.enabled }}
- {name: NO_VNC, value: "true"}
{{- end }}
{{- if and $v.console.enabled $v.console.expose.enabled }}
- {name: CONSOLE_POD_PORT, value: {{ $v.console.expose.port | quote }}}
{{- end }}
{{- end -}}

{{- define "podvm.env" -}}
{{- range $name, $value := . }}
- {name: {{ $name }}, value: {{ $value | quote }}}
{{- end }}
{{- end -}}

{{/* The VM's memory in MiB, from VM_MEMORY's M or G. */}}
{{- define "podvm.memoryMi" -}}
{{- $m := .Values.vm.memory -}}
{{- $n := int (trimSuffix "G" (trimSuffix "M" $m)) -}}
{{- if hasSuffix "G" $m }}{{ mul $n 1024 }}{{ else }}{{ $n }}{{ end -}}
{{- end -}}

{{- define "podvm.netContainer" -}}
{{- $v := .root.Values -}}
- name: net
  image: {{ include "podvm.image" $v.images.net }}
  imagePullPolicy: {{ $v.images.pullPolicy }}
  {{- if .native }}
  restartPolicy: Always
  {{- end }}
  env:
    - {name: VM_IP, value: {{ $v.network.vmIP }}}
    - {name: VM_GW, value: {{ $v.network.vmGateway }}}
    - {name: TAP_OWNER, value: "10001"}
    - {name: VM_CPUS, value: {{ $v.vm.cpus | quote }}}
    - {name: VM_NET_QUEUES, value: {{ $v.network.queues | quote }}}
    {{- if ne $v.network.families "auto" }}
    - {name: IP_FAMILIES, value: {{ $v.network.families }}}
    {{- end }}
    {{- if $v.network.openPorts }}
    - {name: VM_OPEN_PORTS, value: {{ $v.network.openPorts | quote }}}
    {{- end }}
    # The runner's: the network stays while the guest shuts down (and qemu is stopped hard), not a second less.
    {{- include "podvm.sharedEnv" .root | nindent 4 }}
    {{- with $v.network.env }}{{ include "podvm.env" . | trim | nindent 4 }}{{ end }}
  securityContext:
    # Only what `netsidecar run` needs (docs/security.md): NET_ADMIN (bridge, tap, nftables, dnsmasq's ARP
    # entries), NET_BIND_SERVICE, SETUID, SETGID (dnsmasq binds port 67, then drops to nobody), KILL (to stop it
    # then); NET_RAW for `netsidecar probe` and IPv6 router advertisements.
    capabilities:
      drop: [ALL]
      add: [NET_ADMIN, NET_BIND_SERVICE, SETUID, SETGID, KILL, NET_RAW]
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
  {{- if .native }}
  # The handshake is written last, once bridge, tap, rules and DHCP are in place.
  startupProbe:
    exec: {command: [test, -s, /run/podvm/network.json]}
    periodSeconds: 1
    failureThreshold: 60
  {{- end }}
  volumeMounts:
    - {name: run, mountPath: /run/podvm}
    - {name: net-state, mountPath: /run/netsidecar}
    - {name: tun, mountPath: /dev/net/tun}
  resources:
    requests: {cpu: 10m, memory: 32Mi}
    limits: {memory: 128Mi}
{{- end -}}

{{- define "podvm.devices" -}}
{{- $d := .Values.devices -}}
{{- $r := dict -}}
{{- if eq $d.mode "devicePlugin" }}{{ $_ := set $r $d.kvmResource "1" }}{{ end -}}
{{- range $k, $n := $d.extraResources }}{{ $_ := set $r $k $n }}{{ end -}}
{{- range $k, $n := $r }}
{{ $k }}: {{ $n | quote }}
{{- end }}
{{- end -}}

{{- define "podvm.vmContainer" -}}
{{- $v := .Values -}}
{{- $mi := int (include "podvm.memoryMi" .) -}}
- name: vm
  image: {{ include "podvm.image" $v.images.vm }}
  imagePullPolicy: {{ $v.images.pullPolicy }}
  # Extra qemu arguments, appended to the ones the runner plans.
  args: {{ $v.vm.args | toJson }}
  env:
    - {name: IMG_SOURCE, value: {{ $v.image.source | quote }}}
    {{- if $v.image.checksum }}
    - {name: IMG_CHECKSUM, value: {{ $v.image.checksum | quote }}}
    {{- end }}
    {{- if ne $v.image.format "qcow2" }}
    - {name: IMG_FORMAT, value: {{ $v.image.format }}}
    {{- end }}
    {{- with $v.image.ovaDisk }}
    - {name: IMG_OVA_DISK, value: {{ . | quote }}}
    {{- end }}
    {{- with $v.vm.profile }}
    - {name: VM_PROFILE, value: {{ . }}}
    {{- end }}
    {{- with $v.vm.firmware }}
    - {name: VM_FIRMWARE, value: {{ . }}}
    {{- end }}
    {{- with $v.vm.tpm }}
    - {name: VM_TPM, value: {{ . | quote }}}
    {{- end }}
    {{- with $v.dataDisks }}
    - {name: DATA_DISKS, value: {{ include "podvm.dataDisks" . | quote }}}
    {{- end }}
    {{- with $v.vm.cdroms }}
    - {name: VM_CDROMS, value: {{ include "podvm.cdroms" . | quote }}}
    {{- end }}
    - {name: ACCEL, value: {{ ternary "tcg" (ternary "kvm" "auto" $v.devices.requireKvm) (eq $v.devices.mode "tcg") }}}
    - {name: VM_CPUS, value: {{ $v.vm.cpus | quote }}}
    - {name: VM_VHOST, value: {{ $v.network.vhost | quote }}}
    - {name: VM_MEMORY, value: {{ $v.vm.memory }}}
    {{- include "podvm.sharedEnv" . | nindent 4 }}
    {{- if $v.backup.enabled }}
    # A live backup of the pet disk every {{ $v.backup.interval }} onto its backup volume (README "Backups").
    - {name: BACKUP_INTERVAL, value: {{ $v.backup.interval }}}
    {{- if ne (int $v.backup.keep) 2 }}
    - {name: BACKUP_KEEP, value: {{ $v.backup.keep | quote }}}
    {{- end }}
    {{- end }}
    {{- if not $v.console.enabled }}
    - {name: CONSOLE_PORT, value: "off"}
    {{- else if ne (int $v.console.port) 6080 }}
    - {name: CONSOLE_PORT, value: {{ $v.console.port | quote }}}
    {{- end }}
    {{- if $v.console.expose.enabled }}
    - {name: CONSOLE_PASSWORD_FILE, value: /secret/console/token}
    {{- end }}
    {{- if and $v.vnc.enabled $v.vnc.passwordSecret }}
    - {name: VNC_PASSWORD_FILE, value: /secret/vnc/password}
    {{- end }}
    {{- with $v.vm.env }}{{ include "podvm.env" . | trim | nindent 4 }}{{ end }}
  {{- if $v.metrics.enabled }}
  ports:
    - {name: metrics, containerPort: {{ $v.metrics.port }}, protocol: TCP}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities: {drop: [ALL]}
  # Ready means the VM itself answers on the pod IP: the kubelet's connection goes through the 1:1 NAT.
  readinessProbe:
    tcpSocket: {port: {{ $v.readiness.port }}}
    periodSeconds: 5
    failureThreshold: 3
  volumeMounts:
    - {name: run, mountPath: /run/podvm}
    - {name: images, mountPath: /image}
    - {name: disk, mountPath: /vm}
    {{- range $v.dataDisks }}
    - {name: data-{{ .name }}, mountPath: /data/{{ .name }}}
    {{- end }}
    {{- if $v.backup.enabled }}
    - {name: backup, mountPath: /backup}
    {{- end }}
    {{- if or $v.metaData.inline $v.metaData.existingConfigMap }}
    - {name: config, mountPath: /metadata, subPath: metadata, readOnly: true}
    {{- end }}
    {{- if or $v.userData.inline $v.userData.existingSecret }}
    - {name: userdata, mountPath: /userdata, subPath: userdata, readOnly: true}
    {{- end }}
    {{- if $v.console.expose.enabled }}
    - {name: console-token, mountPath: /secret/console, readOnly: true}
    {{- end }}
    {{- if and $v.vnc.enabled $v.vnc.passwordSecret }}
    - {name: vnc-password, mountPath: /secret/vnc, readOnly: true}
    {{- end }}
    - {name: tun, mountPath: /dev/net/tun}
    {{- if eq $v.devices.mode "hostPath" }}
    - {name: kvm, mountPath: /dev/kvm}
    {{- end }}
    - {name: tmp, mountPath: /tmp}
  resources:
    # The VM's memory plus qemu's own (its code, device buffers, the runner): 256Mi requested, 512Mi at most.
    requests:
      cpu: {{ mul (int $v.vm.cpus) 250 }}m
      memory: {{ add $mi 256 }}Mi
      {{- with include "podvm.devices" . }}{{ . | trim | nindent 6 }}{{ end }}
    limits:
      memory: {{ add $mi 512 }}Mi
      {{- with include "podvm.devices" . }}{{ . | trim | nindent 6 }}{{ end }}
{{- end -}}

{{/* The pod spec both workload kinds share; .native runs the network as a native sidecar. */}}
{{- define "podvm.podSpec" -}}
{{- $v := .root.Values -}}
{{- $name := include "podvm.fullname" .root -}}
{{- $suspend := ternary (int $v.vm.suspendTimeout) 0 (eq $v.vm.onStop "suspend") -}}
# At least {{ if $suspend }}SUSPEND_TIMEOUT ({{ $suspend }}s) + {{ end }}SHUTDOWN_TIMEOUT ({{ $v.vm.shutdownTimeout }}s, in BOTH containers) + 6s for the runner's hard stop
# + 10s for the sidecar's teardown: the guest gets its {{ if $suspend }}save or its {{ end }}ACPI power-down and keeps its network until qemu is gone.
terminationGracePeriodSeconds: {{ add (int $v.vm.shutdownTimeout) $suspend 30 }}
# Volumes (the handshake directory, the cache, the disk) writable by the runner's group.
securityContext:
  fsGroup: 10001
{{- with $v.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
initContainers:
  # One-shot and done before anything else starts: turns on IP forwarding in the pod's network namespace (only a
  # privileged container can write /proc/sys) and makes the net-state volume the sidecar's own.
  - name: net-prepare
    image: {{ include "podvm.image" $v.images.net }}
    imagePullPolicy: {{ $v.images.pullPolicy }}
    args: [prepare]
    securityContext:
      privileged: true
    volumeMounts:
      - {name: net-state, mountPath: /run/netsidecar}
    resources:
      requests: {cpu: 10m, memory: 32Mi}
      limits: {memory: 64Mi}
  {{- if .native }}
  # A native sidecar: started, and its startup probe passed, before the runner starts; stopped only after the
  # runner has exited, so the guest keeps its network while it shuts down.
  {{- include "podvm.netContainer" . | nindent 2 }}
  {{- end }}
containers:
  {{- if not .native }}
  {{- include "podvm.netContainer" . | nindent 2 }}
  {{- end }}
  {{- include "podvm.vmContainer" .root | nindent 2 }}
volumes:
  # The handshake, the sockets and the config drive (at most about 400 KiB with the largest METADATA and USERDATA
  # the runner accepts; docs/data-safety.md, "The config drive").
  - name: run
    emptyDir: {medium: Memory, sizeLimit: 2Mi}
  # The sidecar's own state (dnsmasq's lease, its pid), out of the runner's reach.
  - name: net-state
    emptyDir: {medium: Memory, sizeLimit: 1Mi}
  - name: tmp
    emptyDir: {sizeLimit: 64Mi}
  # The shared cache of base images (read-only once fetched; pets use them as backing files).
  - name: images
    persistentVolumeClaim: {claimName: {{ $v.imageCache.existingClaim | default (printf "%s-images" $name) }}}
  {{- if not .native }}
  # The VM's own pet disk, named after the pod's hostname, and its backups.
  - name: disk
    persistentVolumeClaim: {claimName: {{ $name }}-disk}
  {{- if $v.backup.enabled }}
  - name: backup
    persistentVolumeClaim: {claimName: {{ $name }}-backup}
  {{- end }}
  {{- range $v.dataDisks }}
  - name: data-{{ .name }}
    persistentVolumeClaim: {claimName: {{ $name }}-data-{{ .name }}}
  {{- end }}
  {{- end }}
  {{- if or $v.metaData.inline $v.metaData.existingConfigMap }}
  - name: config
    configMap: {name: {{ $v.metaData.existingConfigMap | default (printf "%s-config" $name) }}}
  {{- end }}
  {{- if or $v.userData.inline $v.userData.existingSecret }}
  - name: userdata
    secret: {secretName: {{ $v.userData.existingSecret | default (printf "%s-userdata" $name) }}}
  {{- end }}
  {{- if $v.console.expose.enabled }}
  - name: console-token
    secret: {secretName: {{ $v.console.expose.tokenSecret }}}
  {{- end }}
  {{- if and $v.vnc.enabled $v.vnc.passwordSecret }}
  - name: vnc-password
    secret: {secretName: {{ $v.vnc.passwordSecret }}}
  {{- end }}
  # In the runtimes' default device rules: both containers may open it.
  - name: tun
    hostPath: {path: /dev/net/tun, type: CharDevice}
  {{- if eq $v.devices.mode "hostPath" }}
  # Often visible but not openable in an unprivileged container: prefer devices.mode=devicePlugin.
  - name: kvm
    hostPath: {path: /dev/kvm, type: CharDevice}
  {{- end }}
{{- end -}}

{{/* A claim the release makes: .name, .mode, .class, .size, and a .comment on its access mode. */}}
{{- define "podvm.claim" }}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ .name }}
  {{- include "podvm.metadata" .root | nindent 2 }}
  # Kept by `helm uninstall`: a VM's disk, its backups and the shared cache outlive the release.
  annotations:
    helm.sh/resource-policy: keep
spec:
  {{- with .comment }}
  # {{ . }}
  {{- end }}
  accessModes: [{{ .mode }}]
  {{- with .class }}
  storageClassName: {{ . }}
  {{- end }}
  resources:
    requests: {storage: {{ .size }}}
{{- end }}

{{- define "podvm.annotations" -}}
{{- if and .Values.metrics.enabled .Values.metrics.annotations }}
# Prometheus finds the pod's one metrics endpoint here (METRICS_PORT in both containers; the runner serves it).
annotations:
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ .Values.metrics.port | quote }}
  prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* VM_CDROMS from vm.cdroms: each slot's source with its checksum, or "empty" for a drive without a disc. */}}
{{- define "podvm.cdroms" -}}
{{- $slots := list -}}
{{- range . -}}
{{- if .source -}}
{{- $slots = append $slots (trim (printf "%s %s" .source (.checksum | default ""))) -}}
{{- else -}}
{{- $slots = append $slots "empty" -}}
{{- end -}}
{{- end -}}
{{- join " " $slots -}}
{{- end -}}

{{/* DATA_DISKS from dataDisks: name:/data/<name>:<size>G[:bus]:format for each. */}}
{{- define "podvm.dataDisks" -}}
{{- $entries := list -}}
{{- range . -}}
{{- $entries = append $entries (printf "%s:/data/%s:%dG:%s:%s" .name .name (int .size) (.bus | default "") (.format | default "qcow2")) -}}
{{- end -}}
{{- join "," $entries -}}
{{- end -}}

{{/* A data disk's claim size: the disk's GiB, 1 % and 1 GiB more for qcow2's metadata and a full disk's last writes. */}}
{{- define "podvm.dataClaimSize" -}}
{{- printf "%dGi" (add (div (mul (int .size) 101) 100) 1) -}}
{{- end -}}
