# @summary Install vogeler-agent, write its configuration and keys, and keep it running.
#
# @param authorized_keys
#   Runner public keys the agent obeys, as `vogeler-runner keygen` writes them (optionally
#   restricted: "plugins=dpkg nodes=web* ed25519 ..."). The agent does not start without one.
# @param amqp_url
#   The broker; keep the user and password out of it (amqp_username, amqp_password).
# @param amqp_username
#   This node's own broker user, which may read only this node's queue. undef:
#   "${amqp_user_prefix}-agent-${node}", as `deploy/rabbitmq/setup.sh --agent <node>` creates
#   it on the broker; '' uses the user in amqp_url.
# @param amqp_user_prefix
#   The --user-prefix given to deploy/rabbitmq/setup.sh.
# @param amqp_password
#   This node's broker password: the content of rabbitmq-agent-<node>.password, which
#   setup.sh wrote on the broker (per-node Hiera data, say). Written to
#   /etc/vogeler/keys/amqp-agent.password (0600), never into the config.
# @param collective
#   Prefix of every exchange and queue; fleets sharing a broker pick different ones.
# @param node
#   The node name (its CouchDB document id, and part of its broker user name); undef uses
#   the host name. With amqp_username undef, that is facter's networking.hostname (the
#   short name), written into the config so that the agent and its broker user agree: set
#   node if your nodes are known by their FQDN.
# @param service_manager
#   'systemd' (enable and start the unit) or 'none' (start it in the background with
#   /usr/lib/vogeler/vogeler-service, for hosts and containers without systemd).
# @param package_source
#   undef installs vogeler-agent from an apt repository; a path to a .deb installs that file.
# @param plugins
#   Plugin files to manage, name => { content | source [, mode] }; see vogeler::plugin.
#
# @example
#   class { 'vogeler::agent':
#     amqp_url        => 'amqp://rabbitmq.example.net:5672/vogeler',
#     amqp_password   => Sensitive(lookup('vogeler::amqp_password')),   # this node's own
#     authorized_keys => [file('profile/vogeler/runner.pub')],
#     plugins         => { 'nginx_sites' => { content => file('profile/vogeler/nginx_sites.toml') } },
#   }
class vogeler::agent (
  Array[String[1], 1]                 $authorized_keys,
  String[1]                           $amqp_url = 'amqp://127.0.0.1:5672/vogeler',
  Optional[String]                    $amqp_username = undef,
  String[1]                           $amqp_user_prefix = 'vogeler',
  Optional[Sensitive[String[1]]]      $amqp_password = undef,
  String[1]                           $collective = 'vogeler',
  Optional[String[1]]                 $queue_expires = undef,
  Optional[String[1]]                 $node = undef,
  Integer[1]                          $concurrency = 4,
  Optional[String[1]]                 $http_listen = '127.0.0.1:9188',
  Hash[String[1], Scalar]             $node_facts = {},
  Enum['systemd', 'none']             $service_manager = 'systemd',
  Optional[Pattern[/^\//]]           $package_source = undef,
  Hash[String[1], Hash]               $plugins = {},
  Array[String[1]]                    $plugins_absent = [],
) {
  # The broker user is named after the node: derived, it must be the name the agent uses.
  $node_name = $node ? {
    undef   => $facts['networking']['hostname'],
    default => $node,
  }
  $username = $amqp_username ? {
    undef   => "${amqp_user_prefix}-agent-${node_name}",
    default => $amqp_username,
  }
  $config_node = $amqp_username ? {
    undef   => $node_name,
    default => $node,
  }

  if $package_source {
    package { 'vogeler-agent':
      ensure   => installed,
      provider => dpkg,
      source   => $package_source,
    }
  } else {
    package { 'vogeler-agent':
      ensure => installed,
    }
  }

  if $amqp_password {
    file { '/etc/vogeler/keys/amqp-agent.password':
      ensure    => file,
      owner     => 'root',
      group     => 'root',
      mode      => '0600',
      content   => $amqp_password,
      show_diff => false,
      require   => Package['vogeler-agent'],
      notify    => Service['vogeler-agent'],
    }
  }

  file { '/etc/vogeler/keys/authorized_keys':
    ensure  => file,
    owner   => 'root',
    group   => 'root',
    mode    => '0644',
    content => "${join($authorized_keys, "\n")}\n",
    require => Package['vogeler-agent'],
    notify  => Service['vogeler-agent'],
  }

  file { '/etc/vogeler/agent.toml':
    ensure       => file,
    owner        => 'root',
    group        => 'root',
    mode         => '0644',
    content      => epp('vogeler/agent.toml.epp', {
      'amqp_url'      => $amqp_url,
      'username'      => $username,
      'has_password'  => $amqp_password != undef,
      'collective'    => $collective,
      'queue_expires' => $queue_expires,
      'node'          => $config_node,
      'concurrency'   => $concurrency,
      'http_listen'   => $http_listen,
      'node_facts'    => $node_facts,
    }),
    validate_cmd => '/usr/bin/vogeler-agent --config % --check-config',
    require      => Package['vogeler-agent'],
    notify       => Service['vogeler-agent'],
  }

  $plugins.each |$name, $spec| {
    vogeler::plugin { $name:
      * => $spec,
    }
  }
  $plugins_absent.each |$name| {
    vogeler::plugin { $name:
      ensure => absent,
    }
  }

  if $service_manager == 'systemd' {
    service { 'vogeler-agent':
      ensure => running,
      enable => true,
    }
  } else {
    $ctl = '/usr/lib/vogeler/vogeler-service'
    service { 'vogeler-agent':
      ensure    => running,
      provider  => base,
      start     => "${ctl} start agent",
      stop      => "${ctl} stop agent",
      restart   => "${ctl} restart agent",
      status    => "${ctl} status agent",
      hasstatus => true,
    }
  }
}
