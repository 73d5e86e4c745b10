# Shared functions for the cutover lab scripts (sourced, not run).
# A service is named by a pair: ENV (old|new|dns) and SERVICE
# (nginx|dovecot|postfix for old/new, nsd|unbound for dns).

LAB=${CUTOVER_LAB_DIR:-/tmp/cutover-lab}
LAB_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PASSWORD_FILE=$LAB/secrets/probe.password
USERS=(probe@example.test other@example.test)
NAMES=(webmail imap smtp mx autoconfig mail)
ENV_SERVICES=(nginx dovecot postfix)
# Every lab server as "ENV SERVICE", in start order.
ALL_SERVICES=("dns nsd" "dns unbound" "old nginx" "old dovecot" "old postfix"
  "new nginx" "new dovecot" "new postfix")

die() { echo "lab: $*" >&2; exit 1; }

env_ip() {
  case $1 in
    old) echo 127.0.0.10 ;;
    new) echo 127.0.0.20 ;;
    *) die "unknown environment '$1' (old|new)" ;;
  esac
}

svc_addr() {
  case $2 in
    nsd) echo 127.0.0.30 ;;
    unbound) echo 127.0.0.31 ;;
    *) env_ip "$1" ;;
  esac
}

svc_ports() {
  case $1 in
    nginx) echo 80 443 ;;
    dovecot) echo 143 993 ;;
    postfix) echo 25 465 587 ;;
    nsd | unbound) echo 53 ;;
    *) die "unknown service '$1' (nginx|dovecot|postfix)" ;;
  esac
}

svc_pidfile() {
  case $2 in
    nginx) echo "$LAB/$1/nginx/nginx.pid" ;;
    dovecot) echo "$LAB/$1/dovecot/run/master.pid" ;;
    postfix) echo "$LAB/$1/spool/pid/master.pid" ;;
    nsd | unbound) echo "$LAB/dns/$2.pid" ;;
  esac
}

# Name of the service's main process, so a stale pid file never hits a stranger.
svc_comm() { if [[ $1 == postfix ]]; then echo master; else echo "$1"; fi; }

svc_log() { echo "$LAB/log/$1-$2.log"; }

# Render conf/TEMPLATE to DEST, replacing @KEY@ by VALUE for each KEY=VALUE.
render() {
  local src=$1 dst=$2 kv sed_args=()
  shift 2
  for kv; do sed_args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
  sed "${sed_args[@]}" "$LAB_SRC/conf/$src" >"$dst"
}

# Move FILE.new over FILE with an mtime strictly newer than the old one:
# nsd and Dovecot's passwd-file notice changes by mtime in whole seconds.
replace_file() {
  local f=$1 old now
  old=$(stat -c %Y "$f" 2>/dev/null || echo 0)
  now=$(date +%s)
  mv -f "$f.new" "$f"
  ((now > old)) || touch -d "@$((old + 1))" "$f"
}

wait_until() {
  local end=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < end)) || return 1
    sleep 0.1
  done
}

tcp_open() { timeout 1 bash -c ": >/dev/tcp/$1/$2" 2>/dev/null; }

# A zombie counts as gone (pid 1 here reaps slowly).
alive() {
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $stat != Z* ]]
}

descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1"); do
    echo "$child"
    descendants "$child"
  done
}

# Print the pid of a running service, or fail.
svc_pid() {
  local pidfile pid
  pidfile=$(svc_pidfile "$1" "$2")
  [[ -s $pidfile ]] && read -r pid <"$pidfile" && alive "$pid" &&
    [[ $(ps -o comm= -p "$pid") == "$(svc_comm "$2")"* ]] && echo "$pid"
}

svc_healthy() {
  local addr port
  svc_pid "$1" "$2" >/dev/null || return 1
  addr=$(svc_addr "$1" "$2")
  case $2 in
    nsd | unbound) "$LAB_SRC/dnsq" "$addr" ns.example.test >/dev/null 2>&1 ;;
    *) for port in $(svc_ports "$2"); do tcp_open "$addr" "$port" || return 1; done ;;
  esac
}

# True when nothing listens on the service's address and ports (TCP or UDP).
ports_closed() {
  local addr port
  addr=$(svc_addr "$1" "$2")
  for port in $(svc_ports "$2"); do [[ -z $(ss -Hltun src "$addr:$port") ]] || return 1; done
}

none_alive() {
  local pid
  for pid; do ! alive "$pid" || return 1; done
}

# Stop a service's whole process tree (SIGTERM, then SIGKILL after 10 s).
svc_stop() {
  local pid pids
  if pid=$(svc_pid "$1" "$2"); then
    mapfile -t pids < <(echo "$pid"; descendants "$pid")
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait_until 10 none_alive "${pids[@]}" || kill -KILL "${pids[@]}" 2>/dev/null || true
    wait_until 5 none_alive "${pids[@]}" || die "$1 $2 (pid $pid) does not stop"
  fi
  rm -f "$(svc_pidfile "$1" "$2")"
  wait_until 10 ports_closed "$1" "$2" ||
    die "$1 $2: ports $(svc_ports "$2") on $(svc_addr "$1" "$2") still open after stop"
}

# Start a service from its rendered config unless it is already healthy;
# wait until it answers.
svc_start() {
  local env=$1 svc=$2 log dir
  svc_healthy "$env" "$svc" && return 0
  svc_stop "$env" "$svc"
  log=$(svc_log "$env" "$svc")
  dir=$LAB/$env/$svc
  case $svc in
    nginx) nginx -e "$log" -c "$dir/nginx.conf" >>"$log" 2>&1 </dev/null ;;
    dovecot) dovecot -c "$dir/dovecot.conf" >>"$log" 2>&1 </dev/null ;;
    postfix)
      postfix -c "$dir" check || die "postfix -c $dir check failed; see $log"
      postfix -c "$dir" start >>"$log" 2>&1 </dev/null ;;
    nsd) nsd -c "$LAB/dns/nsd.conf" >>"$log" 2>&1 </dev/null ;;
    unbound) unbound -c "$LAB/dns/unbound.conf" >>"$log" 2>&1 </dev/null ;;
  esac || die "$env $svc failed to start; see $log"
  wait_until 15 svc_healthy "$env" "$svc" || die "$env $svc did not come up; see $log"
}

# The addresses (sorted, space-separated) that every name has in zone STATE.
state_ips() {
  case $1 in
    old) echo 127.0.0.10 ;;
    new) echo 127.0.0.20 ;;
    mixed) echo 127.0.0.10 127.0.0.20 ;;
    *) die "unknown DNS state '$1' (old|new|mixed)" ;;
  esac
}

# A setting of the zone besides its A state, kept in $LAB/dns/NAME: `spf`
# (old|both: the outbound addresses SPF lists), `dkim` and `dmarc` (on|off).
zone_setting() { cat "$LAB/dns/$1" 2>/dev/null || echo "$2"; }

# The SPF policy of example.test. `both` adds the new address through an
# include, as a new provider's policy would, so an SPF evaluator's own lookups
# (the include's TXT, its host's A) are exercised too.
spf_record() {
  case $1 in
    old) echo 'v=spf1 ip4:127.0.0.10 -all' ;;
    both) echo 'v=spf1 ip4:127.0.0.10 include:_spf-new.example.test -all' ;;
    *) die "unknown SPF setting '$1' (old|both)" ;;
  esac
}

# The DKIM key of selector `lab`, made once (nothing signs with it yet).
ensure_dkim_key() {
  local dir=$LAB/dkim log=$LAB/log/openssl.log
  [[ -s $dir/lab.pub ]] && return 0
  mkdir -p "$dir"
  { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/lab.key" &&
    openssl pkey -in "$dir/lab.key" -pubout -outform DER | base64 -w0 >"$dir/lab.pub"; } 2>>"$log" ||
    die "making the DKIM key failed; see $log"
  chmod 0600 "$dir/lab.key"
}

# Its key record as TXT strings: they are joined, each holds at most 255 characters.
dkim_txt() {
  printf '"v=DKIM1; k=rsa; p="'
  fold -w 200 "$LAB/dkim/lab.pub" | sed 's/.*/ "&"/' | tr -d '\n'
}

# Write the example.test zone for STATE (old|new|mixed) with the next serial.
write_zone() {
  local state=$1 zone=$LAB/dns/example.test.zone ips serial name ip
  ips=$(state_ips "$state")
  ensure_dkim_key
  serial=$(($(cat "$LAB/dns/serial" 2>/dev/null || echo 0) + 1))
  {
    printf '$ORIGIN example.test.\n$TTL 300\n'
    printf '@ SOA ns.example.test. hostmaster.example.test. %s 3600 600 86400 300\n' "$serial"
    printf '@ NS ns.example.test.\nns A 127.0.0.30\n@ MX 10 mx.example.test.\n'
    printf '@ TXT "%s"\n_spf-new TXT "v=spf1 a:mx-new.example.test -all"\n' "$(spf_record "$(zone_setting spf old)")"
    [[ $(zone_setting dkim on) == off ]] || printf 'lab._domainkey TXT %s\n' "$(dkim_txt)"
    [[ $(zone_setting dmarc on) == off ]] || printf '_dmarc TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test"\n'
    # The outbound servers' names, which the reverse zone's PTRs point to.
    printf 'mx-old A 127.0.0.10\nmx-new A 127.0.0.20\n'
    # Too large for a 512-byte UDP answer: tests of the DNS probe's TCP retry.
    printf 'big TXT "chunk-%02d-abcdefghijklmnopqrstuvwxyz-0123456789-abcdefghijklmnopqrstuvwxyz"\n' {1..12}
    for name in "${NAMES[@]}"; do
      for ip in $ips; do printf '%s A %s\n' "$name" "$ip"; done
    done
    # The provider's SPF policy that hosted customer domains include
    # (tests/lab/customers), and the autoconfig host their CNAMEs point to.
    printf 'spf TXT "v=spf1 ip4:127.0.0.10 ip4:127.0.0.20 -all"\n'
    if [[ " ${NAMES[*]} " != *" autoconfig "* ]]; then
      for ip in $ips; do printf 'autoconfig A %s\n' "$ip"; done
    fi
  } >"$zone.new"
  replace_file "$zone"
  echo "$serial" >"$LAB/dns/serial"
  echo "$state" >"$LAB/dns/state"
}

dns_answer() { "$LAB_SRC/dnsq" "$1" "$2" A 2>/dev/null | xargs; }

ensure_password() {
  [[ -s $PASSWORD_FILE ]] && return 0
  mkdir -p "$(dirname "$PASSWORD_FILE")"
  chmod 0700 "$(dirname "$PASSWORD_FILE")"
  (umask 077 && openssl rand -hex 16 >"$PASSWORD_FILE")
}

# Replace ENV's Dovecot users file with stdin.
install_users() {
  local f=$LAB/$1/dovecot/users
  cat >"$f.new"
  chgrp dovecot "$f.new"
  chmod 0640 "$f.new"
  replace_file "$f"
}

# If ENV's Dovecot runs, wait until it accepts USER with PASSWORD (passwd-file
# is re-read when it changes, at most once a second).
wait_auth() {
  svc_pid "$1" dovecot >/dev/null || return 0
  wait_until 5 doveadm -c "$LAB/$1/dovecot/dovecot.conf" auth test "$2" "$3" >/dev/null 2>&1 ||
    die "$1 dovecot does not accept the new password of $2; see $(svc_log "$1" dovecot)"
}

# Give every lab user the lab password in ENV.
reset_users() {
  local env=$1 pw user
  pw=$(<"$PASSWORD_FILE")
  for user in "${USERS[@]}"; do printf '%s:{PLAIN}%s\n' "$user" "$pw"; done | install_users "$env"
  for user in "${USERS[@]}"; do wait_auth "$env" "$user" "$pw"; done
}

set_password() {
  local env=$1 user=$2 pw=$3 f=$LAB/$1/dovecot/users
  [[ $pw != *[:$'\n']* ]] || die "a password must not contain ':' or a newline"
  grep -q "^$user:" "$f" || die "no user $user in $f"
  P="{PLAIN}$pw" U=$user awk -F: -v OFS=: '$1 == ENVIRON["U"] { $2 = ENVIRON["P"] } 1' "$f" | install_users "$env"
  wait_auth "$env" "$user" "$pw"
}
